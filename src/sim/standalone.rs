//! The simulators as processes of their own: `ims-proxy sim-ims` and
//! `ims-proxy sim-upstream`, so docker compose can run the simulated IMS and
//! API as separate services in front of a proxy started with `run`.
//!
//! Both serve until SIGINT or SIGTERM (a container's PID 1 gets SIGTERM and
//! has no default handler for it) and then return `Ok`.

use super::{SimIms, SimUpstream};
use std::net::SocketAddr;

/// A `CLIENT_ID=SECRET` pair the simulated IMS accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimClient {
    /// OAuth client id.
    pub client_id: String,
    /// Its secret (a simulator's: never a real one).
    pub secret: String,
}

impl std::str::FromStr for SimClient {
    type Err = String;

    /// Parses `CLIENT_ID=SECRET` (split at the first `=`, so secrets may contain one).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((id, secret)) if !id.trim().is_empty() && !secret.is_empty() => Ok(SimClient {
                client_id: id.trim().to_string(),
                secret: secret.to_string(),
            }),
            _ => Err("expected CLIENT_ID=SECRET".to_string()),
        }
    }
}

/// Serves a simulated IMS on `listen` for `clients` until a signal.
pub async fn run_ims(
    listen: SocketAddr,
    clients: &[SimClient],
    expires_in: Option<u64>,
) -> Result<(), String> {
    if clients.is_empty() {
        return Err("sim-ims needs at least one --client CLIENT_ID=SECRET".into());
    }
    let ims = SimIms::bind(listen)
        .await
        .map_err(|e| format!("simulated IMS cannot listen on {listen}: {e}"))?;
    let state = ims.state();
    for c in clients {
        state.add_client(&c.client_id, &c.secret);
    }
    if let Some(seconds) = expires_in {
        state.set_expires_in(seconds);
    }
    let ids: Vec<&str> = clients.iter().map(|c| c.client_id.as_str()).collect();
    tracing::info!(address = %ims.addr(), path = super::ims::TOKEN_PATH, clients = ?ids,
        "simulated IMS listening");
    until_signal().await;
    tracing::info!("simulated IMS stopped");
    Ok(())
}

/// Serves a simulated Workfront/Fusion-style API on `listen` until a signal.
///
/// It runs in another process than the IMS, so it cannot ask which tokens
/// are valid: it echoes what it received, and the echo shows the bearer token
/// the proxy put in place of the client's key.
pub async fn run_upstream(listen: SocketAddr) -> Result<(), String> {
    let upstream = SimUpstream::bind(listen, None)
        .await
        .map_err(|e| format!("simulated API cannot listen on {listen}: {e}"))?;
    tracing::info!(address = %upstream.addr(), "simulated API listening");
    until_signal().await;
    tracing::info!("simulated API stopped");
    Ok(())
}

/// Waits for SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn until_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_pairs_split_at_the_first_equals_sign() {
        let c: SimClient = "wf-client=se=cret".parse().unwrap();
        assert_eq!(c.client_id, "wf-client");
        assert_eq!(c.secret, "se=cret");
        assert!("no-secret".parse::<SimClient>().is_err());
        assert!("=secret".parse::<SimClient>().is_err());
        assert!("id=".parse::<SimClient>().is_err());
    }
}
