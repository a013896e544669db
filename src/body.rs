//! Body types: streamed bodies counted as they pass, and guards that live as
//! long as a response body does (in-flight gauges, concurrency slots).

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use prometheus::IntCounter;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Error type of bodies the proxy passes on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body streamed from a peer, or one the proxy holds whole (form bodies, refusals).
pub type AnyBody = Either<Incoming, Full<Bytes>>;

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

/// A body held whole.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Counted::new(Either::Right(Full::new(bytes.into())), None)
}

/// A streamed body.
pub fn streamed(body: Incoming, counter: Option<IntCounter>) -> ProxyBody {
    Counted::new(Either::Left(body), counter)
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
