//! The `ims-proxy` command line; everything it runs lives in the library.

use clap::{Parser, Subcommand};
use ims_proxy::logging::{self, LogFormat};
use ims_proxy::sim::standalone::{self, SimClient};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ims-proxy",
    version,
    about = "Authenticating reverse proxy for Adobe Workfront, Workfront Fusion and Workflow Builder APIs",
    after_help = "Examples:\n  ims-proxy demo                                   # try it: simulated IMS and API, no Adobe account\n  ims-proxy check --config config.toml --fetch-tokens\n  ims-proxy run --config /etc/ims-proxy/config.toml --log-format json\n\nRun `ims-proxy COMMAND --help` for a command's options and examples."
)]
struct Cli {
    /// Log line format (logs go to stderr; level from RUST_LOG, default info).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        global = true,
        env = "IMS_PROXY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT (graceful drain); SIGHUP reloads the config.
    #[command(
        after_help = "Examples:\n  WF_CLIENT_SECRET=... ims-proxy run --config /etc/ims-proxy/config.toml\n  IMS_PROXY_CONFIG=config.toml ims-proxy run --log-format json   # one JSON object per line\n  kill -HUP <pid>   or   curl -X POST http://127.0.0.1:9464/reload   # reload the config"
    )]
    Run {
        /// Configuration file (TOML).
        #[arg(long, env = "IMS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config and print routes, credentials and clients with secrets redacted.
    #[command(
        after_help = "Exit status: 0 valid, 1 invalid.\n\nExamples:\n  ims-proxy check --config config.toml\n  ims-proxy check --config config.toml --fetch-tokens   # also ask IMS for one token per credential"
    )]
    Check {
        /// Configuration file (TOML).
        #[arg(long, env = "IMS_PROXY_CONFIG")]
        config: PathBuf,
        /// Also get one token per credential from IMS and report ok/error (never the token).
        #[arg(long)]
        fetch_tokens: bool,
    },
    /// Print the `sha256 = "…"` config line for a client key read on stdin.
    #[command(
        after_help = "Examples:\n  ims-proxy hash-key --generate            # a new key, then its config line\n  printf %s \"$KEY\" | ims-proxy hash-key   # the line for an existing key (no trailing newline)"
    )]
    HashKey {
        /// Make a strong random key and print it with its line.
        #[arg(long)]
        generate: bool,
    },
    /// Run a simulated IMS and upstream API with the proxy in front, on loopback.
    #[command(
        after_help = "Prints where everything listens, a fresh client key and curl commands to paste.\nCtrl-C stops it (exit status 0). No Adobe account or network is needed.\n\nExamples:\n  ims-proxy demo\n  ims-proxy demo --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19464"
    )]
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
    },
    /// Exit 0 when the admin port answers 200 on /healthz (for container HEALTHCHECKs).
    #[command(
        after_help = "An unspecified admin address (0.0.0.0) is reached on loopback.\n\nExamples:\n  ims-proxy healthcheck\n  ims-proxy healthcheck --admin 127.0.0.1:9464 --path /readyz"
    )]
    Healthcheck {
        /// Admin address of the proxy to ask.
        #[arg(long, env = "IMS_PROXY_ADMIN", default_value = "127.0.0.1:9464")]
        admin: SocketAddr,
        /// Path to ask: /healthz (alive) or /readyz (holds valid tokens).
        #[arg(long, default_value = "/healthz")]
        path: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Serve a simulated Adobe IMS token endpoint (docker compose demo; never for production).
    #[command(
        after_help = "Issues `sim-…` tokens at POST /ims/token/v3 for the listed clients, answers like IMS.\nSIGINT/SIGTERM stops it.\n\nExamples:\n  ims-proxy sim-ims --listen 0.0.0.0:9000 --client demo-workfront-client=wf-secret\n  SIM_IMS_CLIENTS=a=secret1,b=secret2 ims-proxy sim-ims --listen 127.0.0.1:9000"
    )]
    SimIms {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// A client the simulated IMS accepts, as CLIENT_ID=SECRET (repeat, or comma-separate in the variable).
        #[arg(
            long = "client",
            env = "SIM_IMS_CLIENTS",
            hide_env_values = true,
            value_delimiter = ',',
            required = true
        )]
        clients: Vec<SimClient>,
        /// Token lifetime in seconds (default 86399, as Adobe's).
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// Serve a simulated Workfront/Fusion-style API that echoes what it receives (docker compose demo).
    #[command(
        after_help = "Any path echoes the request as JSON; .../status/NNN answers NNN, .../slow?ms=N waits.\nSIGINT/SIGTERM stops it.\n\nExample:\n  ims-proxy sim-upstream --listen 0.0.0.0:9100"
    )]
    SimUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    // The proxy port is served by its own worker threads (`server.workers`); this
    // runtime keeps token refreshes, reloads, signals and the admin port.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_guard = logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => {
            runtime().and_then(|rt| rt.block_on(ims_proxy::server::run(config)))
        }
        Command::Check {
            config,
            fetch_tokens,
        } => match runtime() {
            Ok(rt) => {
                let (report, ok) = rt.block_on(ims_proxy::check::check(&config, fetch_tokens));
                print!("{report}");
                if ok {
                    Ok(())
                } else {
                    return ExitCode::from(1);
                }
            }
            Err(e) => Err(e),
        },
        Command::HashKey { generate } => {
            ims_proxy::check::hash_key(generate, &mut std::io::stdin()).map(|line| print!("{line}"))
        }
        Command::Demo {
            listen,
            admin_listen,
        } => runtime().and_then(|rt| rt.block_on(ims_proxy::demo::run(listen, admin_listen))),
        Command::Healthcheck {
            admin,
            path,
            timeout,
        } => ims_proxy::check::healthcheck(admin, &path, timeout),
        Command::SimIms {
            listen,
            clients,
            expires_in,
        } => {
            runtime().and_then(|rt| rt.block_on(standalone::run_ims(listen, &clients, expires_in)))
        }
        Command::SimUpstream { listen } => {
            runtime().and_then(|rt| rt.block_on(standalone::run_upstream(listen)))
        }
    };
    // Pending log lines go out before the final error, so they read in order.
    drop(log_guard);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
