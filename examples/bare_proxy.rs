//! The ceiling of the hyper stack on this job: a proxy that does nothing but
//! nginx-proxy.conf.in's header work (key compare, bearer + x-api-key set,
//! pooled keep-alive upstream, streamed bodies), with none of ims-proxy's
//! features. PERFORMANCE.md compares it with ims-proxy and nginx to show how
//! much of the gap is ours and how much is hyper's and tokio's.
//!
//! `cargo run --release --example bare_proxy -- LISTEN UPSTREAM MODE [THREADS]`
//! MODE: `mt` (one multi-thread runtime, one pool) or `tpc` (thread per core:
//! one current-thread runtime per thread, each with its own accept loop on the
//! shared listener and its own upstream pool).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

const KEY: &str = "load-bench-client-key-0123456789";

type Body = BoxBody<Bytes, hyper::Error>;

/// Everything one request needs, cheap to clone per connection.
#[derive(Clone)]
struct Ctx {
    client: Client<HttpConnector, Incoming>,
    upstream: String,
    bearer: HeaderValue,
    api_key: HeaderValue,
}

async fn handle(ctx: Ctx, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let ok = req
        .headers()
        .get("x-proxy-key")
        .is_some_and(|v| v.as_bytes() == KEY.as_bytes());
    if !ok {
        let body = Full::new(Bytes::from_static(b"{\"error\":\"unauthorized\"}"))
            .map_err(|never| match never {})
            .boxed();
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(resp);
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = path.strip_prefix("/bench").unwrap_or(path);
    let uri: Uri = match format!("http://{}{}", ctx.upstream, path).parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.remove("x-proxy-key");
    headers.remove(http::header::COOKIE);
    headers.insert(http::header::AUTHORIZATION, ctx.bearer.clone());
    headers.insert("x-api-key", ctx.api_key.clone());
    headers.insert(http::header::VIA, HeaderValue::from_static("1.1 bare"));
    match ctx.client.request(req).await {
        Ok(resp) => Ok(resp.map(|b| b.boxed())),
        Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp
}

fn context(upstream: &str) -> Ctx {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let token = format!("Bearer eyJbench.static.{}", "x".repeat(1000));
    Ctx {
        client,
        upstream: upstream.to_owned(),
        bearer: HeaderValue::try_from(token).expect("ascii token"),
        api_key: HeaderValue::from_static("bench-client-id"),
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, ctx: Ctx) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bare_proxy LISTEN UPSTREAM mt|tpc [THREADS]");
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse()?;
    let upstream = args[2].clone();
    let threads: usize = args.get(4).map_or(Ok(2), |t| t.parse())?;
    let std_listener = std::net::TcpListener::bind(listen)?;
    std_listener.set_nonblocking(true)?;
    match args[3].as_str() {
        "mt" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                accept_loop(listener, context(&upstream)).await;
                Ok::<_, std::io::Error>(())
            })?;
        }
        "tpc" => {
            let mut handles = Vec::new();
            for _ in 0..threads {
                let own = std_listener.try_clone()?;
                let upstream = upstream.clone();
                handles.push(std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(own).expect("listener");
                        accept_loop(listener, context(&upstream)).await;
                    });
                }));
            }
            for h in handles {
                let _ = h.join();
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    Ok(())
}
