// telehash-js link setups per second on loopback: a fresh mesh links to one server mesh,
// N times in a row; prints {"links": N, "seconds": total link time, "per_second": ...}.
var common = require('./common.js');
var N = parseInt(process.argv[2] || '30');
common.mesh({}, function(server){
  var done = 0, total = 0;
  function one(){
    if(done >= N){
      process.stdout.write(JSON.stringify({links:done, seconds:total, per_second:done/total}) + '\n');
      process.exit(0);
    }
    common.mesh({}, function(client){
      var start = process.hrtime.bigint();
      var link = client.link(server.linkJson);
      var fired = false;
      link.status(function(err){
        if(fired) return;
        fired = true;
        if(err){ console.error('link failed', err); process.exit(3); }
        total += Number(process.hrtime.bigint() - start) / 1e9;
        done++;
        // close the client's socket: each round is a fresh endpoint, as in the Python bench
        try { client.close && client.close(); } catch(e) {}
        setImmediate(one);
      });
    });
  }
  one();
});
setTimeout(function(){ console.error('timeout'); process.exit(4); }, 120000);
