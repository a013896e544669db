//! The `ims-proxy` command line; everything it runs lives in the library.

use clap::{Parser, Subcommand};
use ims_proxy::logging::{self, LogFormat};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ims-proxy",
    version,
    about = "Authenticating reverse proxy for Adobe Workfront, Workfront Fusion and Workflow Builder APIs"
)]
struct Cli {
    /// Log line format (logs go to stderr; level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT (graceful drain); SIGHUP reloads the config.
    #[command(
        after_help = "Example:\n  WF_CLIENT_SECRET=... ims-proxy run --config /etc/ims-proxy/config.toml"
    )]
    Run {
        /// Configuration file (TOML).
        #[arg(long, env = "IMS_PROXY_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config and print routes, credentials and clients with secrets redacted.
    #[command(
        after_help = "Exit status: 0 valid, 1 invalid.\nExample:\n  ims-proxy check --config config.toml --fetch-tokens"
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
        after_help = "Examples:\n  ims-proxy hash-key --generate\n  printf %s \"$KEY\" | ims-proxy hash-key"
    )]
    HashKey {
        /// Make a strong random key and print it with its line.
        #[arg(long)]
        generate: bool,
    },
    /// Run a simulated IMS and upstream API with the proxy in front, on loopback.
    Demo {
        /// Proxy address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log_guard = logging::init(cli.log_format);
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
