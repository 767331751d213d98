//! Admission: one back-pressure limit shared by every flow. A request holds
//! a permit while it attests, decides and signs; the permits are sized from
//! the sandbox (never more than its instance pool) so no flow can exhaust
//! the WASM pool or the blocking threads for the others. Beyond the permits
//! a bounded number of requests may wait; past that, or after waiting too
//! long, the answer is `overloaded` rather than an ever longer queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::EngineError;

/// How long a request may wait for a permit before it is told to retry.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// The shared limit.
pub struct Admission {
    permits: Semaphore,
    size: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Held while a request does CPU work; dropping it admits the next one.
pub struct Admitted<'a> {
    _permit: SemaphorePermit<'a>,
}

impl Admission {
    /// `size` requests in flight at once, and `max_waiting` queued.
    pub fn new(size: usize, max_waiting: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Semaphore::new(size),
            size,
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Permits in all.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits for a permit, or refuses at once when the queue is full.
    pub async fn admit(&self) -> Result<Admitted<'_>, EngineError> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(Admitted { _permit: permit });
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::get().overload_refusals.inc();
            return Err(EngineError::Overloaded);
        }
        let acquired = tokio::time::timeout(MAX_WAIT, self.permits.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match acquired {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            Ok(Err(_)) | Err(_) => {
                crate::metrics::get().overload_refusals.inc();
                Err(EngineError::Overloaded)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once_and_permits_come_back() {
        let admission = Admission::new(1, 1);
        let first = admission.admit().await.unwrap();
        // One may wait; the next is refused.
        let waiter = async { admission.admit().await.map(drop) };
        let refused = async {
            tokio::task::yield_now().await;
            admission.admit().await.map(drop)
        };
        let release = async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            drop(first);
        };
        let (waited, refused, ()) = tokio::join!(waiter, refused, release);
        assert!(waited.is_ok());
        assert!(matches!(refused, Err(EngineError::Overloaded)));
        assert!(admission.admit().await.is_ok());
    }
}
