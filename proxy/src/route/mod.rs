//! Routes: what a tunnelled stream is for, and both ends of one. The preamble that names a route
//! ([`wire`]), the table of exposed routes and who may open each ([`table`]), the source side that
//! takes a local connection to a peer ([`forward`]) and the target side that checks a stream's
//! preamble and relays it to the exposed target ([`expose`]).
//!
//! A route knows streams only through the traits in [`crate::io`] and the peer's connector
//! ([`crate::peer`]); which transport carries a stream is below it.

pub mod expose;
pub mod forward;
pub mod table;
pub mod wire;

pub use table::{ByteCount, ExposeRoute, Refusal, RouteChanges, RouteError, RouteTable};
