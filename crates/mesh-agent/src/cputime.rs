//! The CPU time one piece of async work spends itself, apart from everything else the process
//! runs meanwhile (the probes of every peer, the watches, the DNS server): what a sync costs.
//!
//! A future on tokio's multi-threaded runtime may run on another thread after each await, so
//! neither the process's nor one thread's CPU clock alone tells its cost. [`measured`] reads the
//! CPU clock of the thread that polls it around each poll and adds the differences; work it hands
//! to the blocking pool reports its own with [`add_blocking`] (the same clock, read on the
//! blocking thread), and a [`Step`] inside it reads how much it has counted so far, so each step
//! of a sync gets its own share. What it waits for elsewhere (a wireguard-go process, the kernel's netlink
//! handling on another thread, the API server) is not its CPU and is not counted.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};

/// What a measurement has counted, as of the start of the current poll.
#[derive(Clone, Copy, Debug, Default)]
struct Clock {
    /// CPU time of the polls before this one, and of the blocking work reported.
    spent: Duration,
    /// The polling thread's CPU clock when this poll began.
    poll_started: Duration,
}

tokio::task_local! {
    /// The clock of the measurement being polled (set for the length of each poll).
    static CLOCK: Cell<Clock>;
}

/// The CPU time the calling thread has used so far (zero if the clock cannot be read: the
/// measurement is lost, never the work).
pub fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Runs `work` and returns its output with the CPU time it used: the sum over its polls of the
/// polling thread's CPU time, plus what blocking work reported with [`add_blocking`].
pub async fn measured<F: Future>(work: F) -> (F::Output, Duration) {
    let mut work = std::pin::pin!(work);
    let mut clock = Clock::default();
    let output = std::future::poll_fn(|cx| {
        clock.poll_started = thread_cpu();
        let (poll, after) = CLOCK.sync_scope(Cell::new(clock), || (work.as_mut().poll(cx), CLOCK.with(Cell::get)));
        clock = Clock { spent: after.spent + thread_cpu().saturating_sub(clock.poll_started), ..after };
        poll
    })
    .await;
    (output, clock.spent)
}

/// The CPU time the measurement that polls the caller has used so far (zero outside one).
pub fn so_far() -> Duration {
    CLOCK
        .try_with(|clock| {
            let clock = clock.get();
            clock.spent + thread_cpu().saturating_sub(clock.poll_started)
        })
        .unwrap_or_default()
}

/// Adds `cpu`, spent on a blocking thread for the work [`measured`] is measuring, to its total;
/// outside a measurement it is dropped.
pub fn add_blocking(cpu: Duration) {
    let _ = CLOCK.try_with(|clock| {
        let mut now = clock.get();
        now.spent += cpu;
        clock.set(now);
    });
}

/// Runs `work` on the blocking pool and reports its CPU time with [`add_blocking`].
pub async fn spawn_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let (output, cpu) = tokio::task::spawn_blocking(move || {
        let started = thread_cpu();
        let output = work();
        (output, thread_cpu().saturating_sub(started))
    })
    .await?;
    add_blocking(cpu);
    Ok(output)
}

/// One step of a measured piece of work: its wall time and its CPU time ([`so_far`] at its end
/// less at its start).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    wall: Instant,
    cpu: Duration,
}

/// What a [`Step`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Took {
    /// Wall time, waits included.
    pub wall: Duration,
    /// Its own CPU time (zero outside a [`measured`] piece of work).
    pub cpu: Duration,
}

impl Step {
    /// Starts timing a step.
    pub fn start() -> Self {
        Self { wall: Instant::now(), cpu: so_far() }
    }

    /// What the step took until now.
    pub fn took(&self) -> Took {
        Took { wall: self.wall.elapsed(), cpu: so_far().saturating_sub(self.cpu) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns at least `at_least` of the calling thread's CPU time.
    fn burn(at_least: Duration) -> u64 {
        let started = thread_cpu();
        let mut x = 0u64;
        while thread_cpu().saturating_sub(started) < at_least {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        x
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_its_own_polls_and_blocking_work_but_not_sleeps_or_other_tasks() {
        // Another task burns CPU on the other worker meanwhile: not counted.
        let other = tokio::spawn(async { burn(Duration::from_millis(150)) });
        let ((), cpu) = measured(async {
            burn(Duration::from_millis(30));
            // Waiting costs no CPU of its own.
            tokio::time::sleep(Duration::from_millis(200)).await;
            burn(Duration::from_millis(30));
            spawn_blocking(|| burn(Duration::from_millis(40))).await.expect("the blocking work runs");
        })
        .await;
        other.await.expect("the other task runs");
        assert!(cpu >= Duration::from_millis(100), "30 + 30 + 40 ms of work, counted {cpu:?}");
        // Generous: a busy machine adds scheduler noise, never 150 ms of someone else's work.
        assert!(cpu < Duration::from_millis(200), "the sleep and the other task are not counted: {cpu:?}");
    }

    #[tokio::test]
    async fn blocking_time_goes_to_the_measurement_it_was_spent_for() {
        // Outside any measurement: dropped, not added to the next one.
        add_blocking(Duration::from_secs(5));
        let ((), cpu) = measured(async { add_blocking(Duration::from_secs(1)) }).await;
        assert!(cpu >= Duration::from_secs(1) && cpu < Duration::from_secs(2), "{cpu:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_counts_its_own_part_of_the_measurement() {
        assert_eq!(Step::start().took().cpu, Duration::ZERO, "outside a measurement: nothing");
        let ((first, second), total) = measured(async {
            burn(Duration::from_millis(20));
            let step = Step::start();
            burn(Duration::from_millis(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
            spawn_blocking(|| burn(Duration::from_millis(20))).await.expect("the blocking work runs");
            let first = step.took();
            let step = Step::start();
            burn(Duration::from_millis(10));
            (first, step.took())
        })
        .await;
        assert!(first.cpu >= Duration::from_millis(50) && first.cpu < Duration::from_millis(70), "{first:?}");
        assert!(first.wall >= Duration::from_millis(100), "the sleep is wall time: {first:?}");
        assert!(second.cpu >= Duration::from_millis(10) && second.cpu < Duration::from_millis(20), "{second:?}");
        assert!(total >= first.cpu + second.cpu + Duration::from_millis(20), "{total:?}");
    }
}
