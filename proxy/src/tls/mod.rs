//! TLS, everything the data plane does with it: the host's certificates and what they name
//! ([`identity`]), the rustls configurations of both ends and the live material behind them
//! ([`context`]), the in-place TLS 1.3 record layer ([`record`], no I/O), one TLS connection on
//! the port from handshake to shutdown ([`session`]), and why a handshake failed ([`failure`]).
//!
//! QUIC uses the same configurations ([`context`]) and identities; its record protection is
//! quinn's. Inside this folder, `record` and `identity` use nothing of the crate; `context` reads
//! `[tls]` as the config validated it ([`settings`]); `session` seals and opens in pooled buffers.

pub mod context;
pub mod failure;
pub mod identity;
pub mod record;
pub mod session;
pub mod settings;

/// ALPN of one tunnelled data stream per TLS connection.
pub const ALPN_DATA: &[u8] = b"migtun/1";
/// ALPN of the agent-to-agent control RPC (HTTP/2).
pub const ALPN_CONTROL: &[u8] = b"h2";
