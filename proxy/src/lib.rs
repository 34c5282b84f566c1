//! migtun data plane: one port (TLS over TCP, QUIC over UDP) carrying any number of tunnelled
//! byte streams between hosts.
//!
//! A connection accepted on a local `[[forward]]` listener becomes one mutually authenticated
//! TLS 1.3 connection to the peer's port ([`forward`], [`connect`]); a short preamble names the
//! route ([`wire`]); the peer checks who may open it ([`routes`]), connects to the `[[expose]]`
//! target ([`expose`]) and the bytes are relayed both ways ([`relay`]). rustls does each TLS
//! handshake; the records after it are migtun's own, sealed and opened in place ([`tls::session`],
//! [`tls::record`]) in buffers from a bounded pool ([`buffers`](io::buffers)). Over QUIC ([`quic`]) a
//! stream is a QUIC stream on the peer's one connection instead; [`transport`] hides which.
//! [`agent`] ties the pieces to one validated [`config::Config`] and drains them on shutdown.
//!
//! # Layers, bottom-up
//!
//! Each layer may use itself and the layers above it in this list, never one below it. A folder is
//! one module of one layer: everything in `tls/` is in the tls layer.
//! `tests/layers.rs` holds the same table and fails on an import that points up;
//! the upward imports left from the flat layout are listed there one by one and only shrink.
//!
//! 1. io: [`metrics`], [`notify`], [`wire`], and the folder [`io`] (local endpoints, socket options,
//!    the accept loop, limits, the buffer pool, and the stream traits the relay is generic over)
//! 2. config: [`config`]
//! 3. tls: the folder [`tls`] (identity, rustls configurations, the record layer, the session)
//! 4. quic: the folder [`quic`] (tuning, endpoint, stream, failure)
//! 5. relay: [`relay`] (the relay, generic over the traits in [`io`])
//! 6. stream: [`transport`] (implements those traits for TLS and QUIC streams)
//! 7. route: [`routes`], [`expose`], [`forward`]
//! 8. peer: [`connect`]
//! 9. port: [`port`]
//! 10. agent: [`agent`], [`ops`], [`reload`], [`preflight`], `fuzzing`, this file
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
