//! migtun data plane: one port (TLS over TCP, QUIC over UDP) carrying any number of tunnelled
//! byte streams between hosts.
//!
//! The data path, in three files: a connection accepted on a local `[[forward]]` listener
//! ([`route::forward`]) gets a stream to the peer from its connector ([`peer`]: a mutually
//! authenticated TLS 1.3 connection from a warm pool, or a QUIC stream on the peer's one
//! connection), sends a short preamble naming the route ([`route::wire`]), and the bytes are
//! relayed both ways ([`relay`]). On the peer, the port ([`port`]) accepts and handshakes, the
//! target side ([`route::expose`]) checks who may open the route ([`route::table`]), connects to
//! the `[[expose]]` target and runs the same relay. rustls does each TLS handshake; the records
//! after it are migtun's own, sealed and opened in place ([`tls::session`], [`tls::record`]) in
//! buffers from a bounded pool ([`io::buffers`]). [`stream::PeerStream`] hides which transport
//! carries a stream. [`agent`] ties the pieces to one validated [`config::Config`], serves the
//! operator's endpoint ([`agent::ops`]) and drains everything on shutdown.
//!
//! # Layers, bottom-up
//!
//! Each layer may use itself and the layers above it in this list, never one below it. A folder is
//! one module of one layer: everything in `tls/` is in the tls layer. `tests/layers.rs` holds the
//! same table and fails on any import that points up, and on two modules that use each other
//! (test modules excepted).
//!
//! 1. io: [`metrics`] (the families and [`metrics::Health`]), [`notify`] (systemd), and [`io`]:
//!    local endpoints, socket options, the accept loop, limits, the buffer pool, and the stream
//!    traits the relay is generic over
//! 2. tls: [`tls`] (`[tls]` settings, identity, rustls configurations, the record layer, the session)
//! 3. quic: [`quic`] (tuning, the UDP endpoint, stream, failure)
//! 4. config: [`config`] (the one Config: load, validate, explain)
//! 5. stream: [`stream`] (one stream type over both transports)
//! 6. relay: [`relay`] (the byte relay; it knows only the traits of [`io`])
//! 7. peer: [`peer`] (connecting to a peer: the TLS warm pool, the QUIC connection, `auto`)
//! 8. route: [`route`] (the preamble, the route table, forward and expose)
//! 9. port: [`port`] (the one listening port: TCP and QUIC accept, handshake limits, ALPN dispatch)
//! 10. agent: [`agent`] (bind, run, drain; the handle, reload, preflight, the ops endpoint),
//!     `fuzzing`, this file
//!
//! The data plane never names the control-plane crate.

pub mod agent;
pub mod config;
/// Entry points for the fuzz targets in `fuzz/` and their corpus test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod port;
pub mod quic;
pub mod relay;
pub mod route;
pub mod stream;
pub mod tls;

pub use agent::{Agent, AgentError};
pub use config::Config;
