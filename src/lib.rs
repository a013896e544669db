//! ims-proxy: a streaming authenticating reverse proxy for Adobe's Workfront,
//! Workfront Fusion and Workflow Builder APIs.

pub mod config;
pub mod error;
pub mod ims;
pub mod metrics;
pub mod secret;
pub mod token;
