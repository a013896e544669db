//! ims-proxy: a streaming authenticating reverse proxy for Adobe's Workfront,
//! Workfront Fusion and Workflow Builder APIs.

pub mod access;
pub mod admin;
pub mod audit;
pub mod body;
pub mod check;
pub mod config;
pub mod conn;
pub mod demo;
pub mod error;
pub mod h1;
pub mod h1_server;
pub mod ims;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod recycle;
pub mod rewrite;
pub mod route;
pub mod secret;
pub mod server;
pub mod sim;
pub mod slots;
pub mod state;
pub mod token;
pub mod upstream;
pub mod workers;
