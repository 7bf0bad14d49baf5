// Shared helpers of the wire benchmarks: loopback only, CS3a-only identities (fast to make).
var os = require('os');
os.networkInterfaces = function(){ return {lo:[{address:'127.0.0.1',netmask:'255.0.0.0',family:'IPv4',mac:'00:00:00:00:00:00',internal:true,cidr:'127.0.0.1/8'}]}; };
var telehash = require('telehash');
var nacl = require('tweetnacl');
var b32 = require('hashname').base32;

exports.telehash = telehash;

// A fresh CS3a identity (telehash.generate() would also make slow RSA keys we never use).
exports.identity = function(){
  var pair = nacl.box.keyPair();
  return {keys:{'3a':b32.encode(Buffer.from(pair.publicKey))},
          secrets:{'3a':b32.encode(Buffer.from(pair.secretKey))}};
};

// Start a udp4 mesh on 127.0.0.1; extra extensions may be given.
exports.mesh = function(extra, cb){
  var exts = {udp4:telehash.extensions.udp4, path:telehash.extensions.path};
  Object.keys(extra || {}).forEach(function(k){ exts[k] = extra[k]; });
  var id = exports.identity();
  telehash.mesh({id:id, ip:'127.0.0.1', extensions:exts}, function(err, mesh){
    if(err) throw err;
    mesh.accept = function(from){ mesh.link(from); };
    mesh.linkJson = {keys:id.keys, paths:mesh.paths()};
    cb(mesh);
  });
};
