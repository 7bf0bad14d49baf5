// telehash-js reliable channel throughput on loopback (udp4): MiB megabytes from one mesh to
// another through a custom reliable channel; the sender keeps at most WINDOW packets
// unacknowledged (telehash-js's receiver drops seqs beyond ack + 50).
// Prints {"bytes": ..., "seconds": ..., "mib_per_s": ...}.
var common = require('./common.js');
var MIB = parseFloat(process.argv[2] || '8');
var BODY = 1000;   // body bytes per packet: a v3 inner packet is at most 1400 bytes with its head
var WINDOW = 32;   // below the window of 50, where telehash-js transfers stall (interop README)
var total = Math.floor(MIB * 1048576 / BODY);
var received = 0, start = 0;
var sink = {name:'sink', mesh:function(mesh, done){
  done(undefined, {open:{sink:function(args, open, cbOpen){
    var chan = this.x.channel(open);
    chan.receiving = function(err, packet, cb){
      if(err){ console.error('sink err', err); return cb(); }
      received += packet.body.length;
      if(packet.json.end){
        var seconds = (Date.now() - start) / 1000;
        process.stdout.write(JSON.stringify({bytes:received, seconds:seconds,
          mib_per_s:received / 1048576 / seconds}) + '\n');
        process.exit(0);
      }
      cb();
    };
    chan.receive(open);
  }}});
}};
common.mesh({sink:sink}, function(server){
  common.mesh({}, function(client){
    var link = client.link(server.linkJson);
    var began = false;
    link.status(function(err){
      if(err || began) return;
      began = true;
      var body = Buffer.alloc(BODY, 7);
      var chan = link.x.channel({json:{type:'sink', seq:1}});
      chan.receiving = function(err, packet, cb){ cb(); };
      var sent = 0;
      start = Date.now();
      chan.send({json:{type:'sink', seq:1}, body:body});
      sent++;
      function pump(){
        while(sent < total && chan.outq.length < WINDOW){
          sent++;
          chan.send({json:(sent === total) ? {end:true} : {}, body:body});
        }
        if(sent < total) setImmediate(pump);
      }
      pump();
    });
  });
});
setTimeout(function(){ console.error('timeout'); process.exit(4); }, 300000);
