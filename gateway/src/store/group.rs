//! Group commit, as the backends with one writer thread do it: the work
//! that queued up while the previous transaction committed goes into the
//! next one, so many callers share one commit, and each still hears back
//! only after it.

use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{StoreError, Txn, Work};

/// A unit of work and where its caller waits for the outcome.
pub(super) type Job = (Work, oneshot::Sender<Result<(), StoreError>>);

/// Most units of work folded into one transaction.
const MAX_GROUP: usize = 512;

/// `first` and whatever else is queued, up to [`MAX_GROUP`], split into the
/// work and the callers waiting for it.
pub(super) fn gather(
    first: Job,
    rx: &mpsc::Receiver<Job>,
) -> (Vec<Work>, Vec<oneshot::Sender<Result<(), StoreError>>>) {
    let mut batch = vec![first];
    while batch.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch.into_iter().unzip()
}

/// Runs the work in arrival order, so each unit sees the writes of those
/// before it; the first failure stops the group (nothing of it may commit).
pub(super) fn run(work: Vec<Work>, txn: &mut dyn Txn) -> Result<(), StoreError> {
    for w in work {
        w(txn)?;
    }
    Ok(())
}

/// Tells every caller of the group its outcome: all committed, or none.
pub(super) fn reply(replies: Vec<oneshot::Sender<Result<(), StoreError>>>, outcome: &Result<(), StoreError>) {
    if let Err(e) = outcome {
        tracing::error!(error = %e, "store commit failed; {} writes refused", replies.len());
    }
    for r in replies {
        let _ = r.send(match outcome {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Backend("the transaction was rolled back".into())),
        });
    }
}
