//! End-to-end scenarios, one module per guarantee, all in one test binary (linking is the slow
//! step on small machines).

mod bad_input;
mod drain;
mod fanout;
mod replay;
mod slow_consumer;
mod sse;
