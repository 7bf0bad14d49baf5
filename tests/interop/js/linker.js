// A telehash-js 0.4.18 mesh that links to a p2pcloud endpoint (JS initiates).
// argv[2]: link JSON {"hashname","keys":{"3a":b32},"paths":[...]} of the p2pcloud node.
// argv[3]: channel type to open once the link is up (default "echo"), reliable.
// Prints JSON lines on stdout: {"event":"ready",...}, {"event":"up"}, {"event":"chan",...}.
var os = require('os');
os.networkInterfaces = function(){ return {lo:[{address:'127.0.0.1',netmask:'255.0.0.0',family:'IPv4',mac:'00:00:00:00:00:00',internal:true,cidr:'127.0.0.1/8'}]}; };
var telehash = require('telehash');
if(process.env.THDEBUG) telehash.log({debug:console.error});
function out(o){ process.stdout.write(JSON.stringify(o)+'\n'); }
var target = JSON.parse(process.argv[2]);
var ctype = process.argv[3] || 'echo';
var exts = {udp4:telehash.extensions.udp4, path:telehash.extensions.path};
telehash.generate(function(err, id){
  if(err){ console.error('generate err', err); process.exit(2); }
  var o = {keys:{'3a':id.keys['3a']}, secrets:{'3a':id.secrets['3a']}};
  telehash.mesh({id:o, ip:'127.0.0.1', extensions:exts}, function(err, mesh){
    if(err){ console.error('mesh err', err); process.exit(2); }
    mesh.accept = function(from){ mesh.link(from); };
    out({event:'ready', hashname:mesh.hashname, keys:o.keys, port:mesh.paths()[0].port});
    var link = mesh.link(target);
    var opened = false;
    link.status(function(err){
      if(err){ out({event:'down', err:String(err)}); return; }
      out({event:'up', hashname:link.hashname});
      if(opened) return;
      opened = true;
      var chan = link.x.channel({json:{type:ctype, seq:1}});
      chan.receiving = function(err, packet, cb){
        if(err){ out({event:'chan-err', err:String(err)}); return cb(); }
        out({event:'chan', json:packet.json, body:packet.body.toString('base64')});
        if(packet.json.end && !chan.sentEnd){ chan.sentEnd = true; chan.send({json:{end:true}}); }
        cb();
      };
      chan.send({json:{type:ctype, seq:1, msg:'hello from js'}, body:Buffer.from('js says hi')});
      chan.send({json:{msg:'second'}, body:Buffer.from('more from js')});
    });
  });
});
setTimeout(function(){ console.error('linker exiting'); process.exit(0); }, parseInt(process.env.LIFE||'25000'));
