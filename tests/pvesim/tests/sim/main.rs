//! Integration tests: the simulator over real HTTPS on loopback, driven by reqwest (as the
//! coordinator's client is) and by a raw TLS client where the exact status line matters.

mod binary;
mod common;
mod faults;
mod lifecycle;
mod storage;
mod transport;
mod validation;
