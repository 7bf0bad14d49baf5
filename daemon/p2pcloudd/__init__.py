"""p2pcloudd: the daemon and the command line that people run (uses only public p2pcloud)."""
