//! Body types: streamed bodies counted as they pass, and guards that live as
//! long as a response body does (in-flight gauges, concurrency slots).

use crate::h1;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Error type of bodies the proxy passes on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body streamed from a peer, or one the proxy holds whole (form bodies, refusals).
pub enum AnyBody {
    /// Streamed through hyper: a client's upload, or an upstream's response on hyper's client.
    Incoming(Incoming),
    /// Held whole; the first poll takes it.
    Held(Option<Bytes>),
    /// An upstream's HTTP/1.1 response, read by the proxy's own exchange.
    Upstream(h1::ResponseBody),
}

impl Body for AnyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            AnyBody::Incoming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            AnyBody::Held(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            AnyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AnyBody::Incoming(b) => b.is_end_stream(),
            AnyBody::Held(b) => b.as_ref().is_none_or(Bytes::is_empty),
            AnyBody::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AnyBody::Incoming(b) => b.size_hint(),
            AnyBody::Held(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            AnyBody::Upstream(b) => b.size_hint(),
        }
    }
}

/// A client's request body: hyper's stream, or none at all (a head the proxy's own
/// HTTP/1.1 server read, which carries no body by construction).
pub enum ClientBody {
    /// Streamed through hyper's server.
    Incoming(Incoming),
    /// No body.
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Incoming(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Incoming(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What the proxy sends (upstream requests and client responses).
pub type ProxyBody = Counted<AnyBody>;

/// Anything that must live until a body ends or is dropped.
pub trait Guard: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> Guard for T {}

pin_project! {
    /// A body that adds its bytes to a counter and drops `guard` with itself.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        counter: Option<IntCounter>,
        guard: Option<Box<dyn Guard>>,
        drop_trailers: bool,
    }
}

impl<B> Counted<B> {
    /// Wraps `inner`; `counter` gets every data byte.
    pub fn new(inner: B, counter: Option<IntCounter>) -> Self {
        Counted {
            inner,
            counter,
            guard: None,
            drop_trailers: false,
        }
    }

    /// Ends the body at its trailers instead of passing them on: a client's request
    /// trailers (`authorization`, `x-api-key`, …) would skip the header scrubbing and
    /// reach an HTTP/2 upstream.
    pub fn without_trailers(mut self) -> Self {
        self.drop_trailers = true;
        self
    }

    /// Keeps `guard` alive until this body ends or is dropped, along with any guard it already holds.
    pub fn with_guard(mut self, guard: impl Guard) -> Self {
        self.guard = Some(match self.guard.take() {
            Some(held) => Box::new((held, guard)),
            None => Box::new(guard),
        });
        self
    }
}

impl Counted<AnyBody> {
    /// The whole body, if the proxy holds it (and it has not been polled).
    pub fn held(&self) -> Option<&Bytes> {
        match &self.inner {
            AnyBody::Held(b) => b.as_ref(),
            _ => None,
        }
    }
}

/// A body held whole.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Counted::new(AnyBody::Held(Some(bytes.into())), None)
}

/// A streamed body.
pub fn streamed(body: Incoming, counter: Option<IntCounter>) -> ProxyBody {
    Counted::new(AnyBody::Incoming(body), counter)
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if *this.drop_trailers && frame.is_trailers() => {
                // Trailers come last: the body ends here.
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(c), Some(data)) = (this.counter.as_ref(), frame.data_ref()) {
                    c.inc_by(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                // The exchange is over: release slots and gauges now, not when hyper drops the body.
                this.guard.take();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
