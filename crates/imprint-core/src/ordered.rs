//! Work done on several threads whose results are used in order: an image's frames are
//! compressed this way when it is packed and decoded this way when it is written.

use crossbeam_channel::{bounded, Receiver, Sender};

/// Runs `work` over `items` on `threads` threads, each with its own state made by `state`,
/// and hands the results to `consume`, on a thread of its own, in the items' order.
///
/// `items` is drawn on the calling thread (it may block on a free buffer or a read, and need
/// not be `Send`). At most `depth` items are between `items` and `consume` at once, plus the
/// one `items` just produced. `consume` returning `false` stops the run: no more items are
/// drawn, and the ones in flight are dropped. Items reach the workers in order, so the result
/// `consume` waits for is always being worked on or next in line: the run cannot wedge on its
/// own ordering.
pub fn map_in_order<T, R, S>(
    items: impl Iterator<Item = T>,
    threads: usize,
    depth: usize,
    state: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, T) -> R + Sync,
    mut consume: impl FnMut(R) -> bool + Send,
) where
    T: Send,
    R: Send,
{
    let depth = depth.max(1);
    std::thread::scope(|s| {
        let (job_tx, job_rx) = bounded::<(T, Sender<R>)>(depth);
        // One single-use channel per item, queued in the items' order.
        let (order_tx, order_rx) = bounded::<Receiver<R>>(depth);
        for _ in 0..threads.max(1) {
            let job_rx = job_rx.clone();
            let (state, work) = (&state, &work);
            s.spawn(move || {
                let mut st = state();
                for (item, done) in job_rx {
                    // The consumer may have stopped.
                    let _ = done.send(work(&mut st, item));
                }
            });
        }
        drop(job_rx);
        s.spawn(move || {
            for done in order_rx {
                // A worker that panicked dropped its sender; the scope re-raises the panic.
                let Ok(r) = done.recv() else { break };
                if !consume(r) {
                    break;
                }
            }
        });
        for item in items {
            let (done_tx, done_rx) = bounded(1);
            if order_tx.send(done_rx).is_err() || job_tx.send((item, done_tx)).is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn results_come_in_the_items_order_whatever_order_the_workers_finish_in() {
        for threads in [1, 2, 5] {
            let mut got = Vec::new();
            map_in_order(
                0..40u64,
                threads,
                3,
                || (),
                |_, i| {
                    // Early items take longest, so later ones finish first.
                    std::thread::sleep(Duration::from_millis((40 - i) % 7));
                    i * i
                },
                |r| {
                    got.push(r);
                    true
                },
            );
            assert_eq!(got, (0..40u64).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn each_worker_keeps_its_own_state_and_all_of_them_work() {
        let made = AtomicUsize::new(0);
        let mut seen = std::collections::BTreeSet::new();
        map_in_order(
            0..64u32,
            4,
            4,
            || made.fetch_add(1, Ordering::SeqCst),
            |me, _| {
                std::thread::sleep(Duration::from_millis(2));
                *me
            },
            |worker| {
                seen.insert(worker);
                true
            },
        );
        assert_eq!(made.load(Ordering::SeqCst), 4);
        assert!(seen.len() > 1, "one worker did everything: {seen:?}");
    }

    #[test]
    fn a_consumer_that_stops_stops_the_items_and_in_flight_stays_within_depth() {
        let taken = AtomicUsize::new(0);
        let worked = AtomicUsize::new(0);
        let mut got = Vec::new();
        map_in_order(
            (0..1_000_000u64).inspect(|_| {
                taken.fetch_add(1, Ordering::SeqCst);
            }),
            2,
            3,
            || (),
            |_, i| {
                worked.fetch_add(1, Ordering::SeqCst);
                i
            },
            |r| {
                got.push(r);
                // Wait until the producer is as far ahead as it may get.
                std::thread::sleep(Duration::from_millis(5));
                r < 9
            },
        );
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let taken = taken.load(Ordering::SeqCst);
        // Ten consumed, at most `depth` queued in order behind them, one in the producer's hand.
        assert!(taken <= 10 + 3 + 1, "took {taken} items");
        assert!(worked.load(Ordering::SeqCst) <= taken);
    }
}
