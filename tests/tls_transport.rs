//! The data plane over TLS/TCP: the shared stream suite, plus what only TLS has to show.

mod common;

common::suite::transport_suite!("tls");
