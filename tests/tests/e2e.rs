//! End-to-end scenarios, one module per guarantee, all in one test binary (linking is the slow
//! step on small machines).

mod bad_input;
mod browser_assets;
mod chaos;
mod cluster;
mod dashboards;
mod deploy_config;
mod drain;
mod engine_suite;
mod failovers;
mod fanout;
mod fuzz;
mod layout;
mod load_balancer;
mod operator_plane;
mod origins;
mod properties;
mod pushctl;
mod redis_faults;
mod replay;
mod resource_limits;
mod slow_consumer;
mod sse;
mod storm;
