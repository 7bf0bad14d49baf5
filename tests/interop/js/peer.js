// A telehash-js 0.4.18 mesh in a role chosen by the test (written for p2pcloud's interop tests).
// argv[2]: JSON options:
//   transports: ["udp4"] (default) and/or "tcp4"
//   link:       link JSON {"hashname","keys","paths"} of a p2pcloud node to link to (JS initiates)
//   open:       a channel type to open (reliable) once a link is up, e.g. "echo"
// It accepts every link, serves a reliable "echo" channel (replies {"echo": msg} + the body, and
// end to end), pings each new link's path channel, and prints JSON lines on stdout:
//   {"event":"ready",...} {"event":"up"} {"event":"path","latency"} {"event":"chan",...}
var os = require('os');
os.networkInterfaces = function(){ return {lo:[{address:'127.0.0.1',netmask:'255.0.0.0',family:'IPv4',mac:'00:00:00:00:00:00',internal:true,cidr:'127.0.0.1/8'}]}; };
var telehash = require('telehash');
if(process.env.THDEBUG) telehash.log({debug:console.error});
var opts = JSON.parse(process.argv[2] || '{}');
function out(o){ process.stdout.write(JSON.stringify(o) + '\n'); }

var echoExt = {name:'echo', mesh:function(mesh, done){
  done(undefined, {open:{echo:function(args, open, cbOpen){
    var chan = this.x.channel(open);
    chan.receiving = function(err, packet, cb){
      if(err){ out({event:'served-err', err:String(err)}); return cb(); }
      out({event:'served', json:packet.json, body:packet.body.toString('base64')});
      if(packet.json.end){ chan.send({json:{end:true}}); return cb(); }
      chan.send({json:{echo:packet.json.msg || null}, body:packet.body});
      cb();
    };
    chan.receive(open);
  }}});
}};

var exts = {path:telehash.extensions.path, echo:echoExt};
(opts.transports || ['udp4']).forEach(function(t){ exts[t] = telehash.extensions[t]; });

function watch(link){
  var seen = false;
  link.status(function(err){
    if(err){ out({event:'down', hashname:link.hashname, err:String(err)}); return; }
    if(seen) return;
    seen = true;
    out({event:'up', hashname:link.hashname});
    link.ping(function(err, latency){
      out({event:'path', err:err ? String(err) : null, latency:latency});
    });
    if(opts.open) openChannel(link, opts.open);
  });
}

function openChannel(link, type){
  var chan = link.x.channel({json:{type:type, seq:1}});
  chan.receiving = function(err, packet, cb){
    if(err){ out({event:'chan-err', err:String(err)}); return cb(); }
    out({event:'chan', json:packet.json, body:packet.body.toString('base64')});
    if(packet.json.end && !chan.ended){ chan.ended = true; chan.send({json:{end:true}}); }
    cb();
  };
  chan.send({json:{type:type, seq:1, msg:'hello from js'}, body:Buffer.from('js says hi')});
  chan.send({json:{msg:'second'}, body:Buffer.from('more from js')});
}

// Only a CS3a identity: telehash.generate() would also make RSA (2a) keys, which takes seconds.
var nacl = require('tweetnacl');
var b32 = require('hashname').base32;
(function(){
  var pair = nacl.box.keyPair();
  var ident = {keys:{'3a':b32.encode(Buffer.from(pair.publicKey))},
               secrets:{'3a':b32.encode(Buffer.from(pair.secretKey))}};
  telehash.mesh({id:ident, ip:'127.0.0.1', extensions:exts}, function(err, mesh){
    if(err){ console.error('mesh', err); process.exit(2); }
    mesh.accept = function(from){ watch(mesh.link(from)); };
    out({event:'ready', hashname:mesh.hashname, keys:ident.keys, paths:mesh.paths()});
    if(opts.link) watch(mesh.link(opts.link));
  });
})();
setTimeout(function(){ console.error('peer.js exiting'); process.exit(0); }, parseInt(process.env.LIFE || '25000'));
