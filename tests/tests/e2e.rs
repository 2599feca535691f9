//! End-to-end scenarios, one module per guarantee, all in one test binary (linking is the slow
//! step on small machines).

mod fanout;
mod replay;
