//! The QUIC transport: one UDP endpoint on the port number of the TCP listener, serving peers
//! (server role) and dialling them (client role); one bidirectional QUIC stream per tunnelled
//! connection, on one QUIC connection per peer.
//!
//! The crypto is the TLS transport's: the same rustls configurations (TLS 1.3, aws-lc-rs,
//! client certificates required, ALPN `migtun/1`) wrapped for QUIC, so identity, authorization
//! (by [`crate::route::RouteTable::authorize`]), handshake failure reasons and metrics are the
//! same whichever transport a stream takes. The stream semantics are the TLS transport's too:
//! the same preamble and replies, EOF as a QUIC `FIN` ([`quinn::SendStream::finish`]), a reset
//! as `RESET_STREAM` plus `STOP_SENDING` ([`stream::QuicStream`]'s [`crate::io::Reset`]).
//!
//! [`tuning`] sets the endpoint up (windows, limits, congestion control, the rustls configurations
//! for QUIC), [`endpoint`] binds the UDP socket and serves peers, [`stream`] is one tunnelled
//! connection, [`failure`] says why a handshake failed.

pub use quinn;

pub mod endpoint;
pub mod failure;
pub mod stream;
pub mod tuning;
