//! Statements shared by the requests waiting at a moment: the claims of
//! request ids, their outcomes, and quota counts each go to PostgreSQL as
//! one statement per batch instead of one per request (as the audit queue
//! commits its records), which on a loaded replica is most of the
//! database's work per request.

/// Runs what is sent on `asked` in batches, one statement each: those
/// waiting at the moment, up to `max` (as the audit queue commits its
/// records), so each costs a part of one round trip instead of one of its
/// own. Up to `in_flight` batches run at once, so an item at low load
/// goes out at once. `split` takes out of a batch what must wait for the
/// next one. Ends when every sender is dropped.
pub(crate) async fn in_batches<T, Run, Done>(
    mut asked: tokio::sync::mpsc::Receiver<T>,
    max: usize,
    in_flight: usize,
    split: fn(&mut Vec<T>) -> Vec<T>,
    run: Run,
) where
    T: Send + 'static,
    Run: Fn(Vec<T>) -> Done,
    Done: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut batch: Vec<T> = Vec::new();
    let mut later: Vec<T> = Vec::new();
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        if later.is_empty() {
            if asked.recv_many(&mut batch, max).await == 0 {
                return;
            }
        } else {
            batch.append(&mut later);
            while batch.len() < max {
                match asked.try_recv() {
                    Ok(one) => batch.push(one),
                    Err(_) => break,
                }
            }
        }
        later = split(&mut batch);
        let done = run(std::mem::take(&mut batch));
        tokio::spawn(async move {
            let _permit = permit;
            done.await;
        });
    }
}

/// Answers each item of a batch with its own result, or all with the
/// batch's error.
pub(crate) fn answer_each<T, R>(
    batch: Vec<T>,
    results: Result<Vec<R>, Box<dyn std::error::Error + Send + Sync>>,
    reply: impl Fn(T) -> tokio::sync::oneshot::Sender<Result<R, String>>,
) {
    let results = results.and_then(|results| {
        if results.len() == batch.len() {
            Ok(results)
        } else {
            Err(format!(
                "a batch of {} was answered with {} results",
                batch.len(),
                results.len()
            )
            .into())
        }
    });
    match results {
        Ok(results) => {
            for (one, result) in batch.into_iter().zip(results) {
                let _ = reply(one).send(Ok(result));
            }
        }
        Err(e) => {
            let why = crate::describe(e.as_ref());
            for one in batch {
                let _ = reply(one).send(Err(why.clone()));
            }
        }
    }
}

/// Sends the item `make` builds (around its reply channel) to the batcher
/// `batcher` (named `what` in errors), and waits for its own answer.
pub(crate) async fn ask<T, R>(
    batcher: &tokio::sync::mpsc::Sender<T>,
    what: &str,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<R, String>>) -> T,
) -> Result<R, Box<dyn std::error::Error + Send + Sync>> {
    let stopped = || format!("the {what} batcher has stopped");
    let (reply, answer) = tokio::sync::oneshot::channel();
    batcher.send(make(reply)).await.map_err(|_| stopped())?;
    Ok(answer.await.map_err(|_| stopped())??)
}
