//! A team of threads that splits one layer of one image: the fork-join under the kernels'
//! `run_on` calls.
//!
//! A forward pass of a single image calls the team once per layer, every few microseconds
//! (ResNet-20 on MNIST: ~25 calls of 5–30 µs each at batch 1). Rayon's pool puts an idle worker
//! to sleep after a few rounds of `sched_yield` and wakes it through the kernel, which on this
//! project's machines cost as much as the split saved: two threads ran a single image no faster
//! than one. The team's helpers instead spin after their last job (`spin_loop` for [`PAUSE`],
//! then `sched_yield`, which leaves the core to other work that wants it) for [`SPIN`], and only
//! then park, so consecutive layers find them awake; the caller takes jobs too, and jobs are
//! claimed one at a time, so a helper that the OS has descheduled just takes fewer (its share is
//! not held up waiting for it, unless it was in the middle of a job).
//!
//! When a call waits for the OS longer than [`STALL`] (on a machine busier than the team, the
//! OS deschedules a helper in the middle of its job, or hands a woken helper the caller's
//! core, for a time slice; a helper that only wakes up late is not counted: its job starts
//! late but runs as long as the caller's), the team runs its calls on the caller alone for [`BACK_OFF`], and
//! says so through [`Team::threads`] (1), so kernels split their work for one thread; then it
//! tries again. Two threads on a loaded machine then cost about what one does, instead of a
//! time slice per layer.
//!
//! One atomic word holds the call's generation, its number of jobs and the next unclaimed job;
//! a job is claimed by a compare-and-swap on that word, so a helper that wakes up late cannot
//! take a job of a call that has ended (its generation no longer matches). A panic in a job is
//! caught, the call finishes its other jobs, and the caller panics after all have stopped.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a helper spins for the next call before it parks: long enough to cover the gap
/// between two layers and between two forward passes run back to back, short enough not to
/// hold a core that other work wants for long.
pub const SPIN: Duration = Duration::from_micros(50);

/// How long a helper waiting for the next call spins on `spin_loop` before it spins on
/// `sched_yield` instead (which lets other threads that want the core run): the gap between
/// two layers of one forward pass is shorter.
pub const PAUSE: Duration = Duration::from_micros(10);

/// A helper whose job has run this long, and four times longer than the caller's own jobs of
/// the call, was descheduled in the middle of it (or waking a parked helper took the caller's
/// core this long): the team backs off. Far more than a job's imbalance, less than a scheduler
/// time slice (milliseconds).
pub const STALL: Duration = Duration::from_micros(200);

/// How long a team runs its calls on the caller alone after a [`STALL`]: waiting for a
/// descheduled thread costs a time slice per call, far more than the split saves, so the team
/// backs off and tries again after this.
pub const BACK_OFF: Duration = Duration::from_millis(100);

/// Most jobs one call may have.
pub const MAX_JOBS: usize = (1 << 16) - 1;

/// The threads a split runs on: the calling thread and `threads − 1` helpers started with the
/// team (none for one thread, where every call runs its jobs in order on the caller).
pub struct Team {
    threads: usize,
    shared: Option<Arc<Shared>>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

/// A call's jobs, on the caller's stack while the call runs.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// Generation (bits 32..64), jobs of the call (16..32), next unclaimed job (0..16).
    state: AtomicU64,
    /// The running call's jobs (valid while its generation has unfinished jobs).
    job: AtomicPtr<Job<'static>>,
    /// Jobs of the running call that have finished.
    done: AtomicUsize,
    /// Set when a job of the running call panicked.
    panicked: AtomicBool,
    /// Set while a call runs: a second caller (or a job calling the team) runs in order instead.
    busy: AtomicBool,
    /// Per helper: parked, or about to park.
    sleeping: Vec<AtomicBool>,
    /// Until when (nanoseconds since `started`) calls run on the caller alone ([`BACK_OFF`]).
    alone_until: AtomicU64,
    /// Whether a [`STALL`] makes the team back off.
    backs_off: bool,
    /// Per helper: when (nanoseconds since `started`) it claimed the job it is running, 0 when
    /// it runs none.
    claimed_at: Vec<AtomicU64>,
    started: Instant,
    stop: AtomicBool,
}

const fn pack(generation: u64, jobs: usize, next: usize) -> u64 {
    (generation << 32) | ((jobs as u64) << 16) | next as u64
}

const fn unpack(state: u64) -> (u64, usize, usize) {
    (state >> 32, ((state >> 16) & 0xffff) as usize, (state & 0xffff) as usize)
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Whether calls run on the caller alone ([`BACK_OFF`]).
    fn backing_off(&self) -> bool {
        self.now() < self.alone_until.load(Ordering::Relaxed)
    }

    /// Claims and runs jobs of generation `generation` until none is left; `helper`: which
    /// helper runs them (`None`: the caller).
    fn work(&self, generation: u64, helper: Option<usize>) {
        loop {
            let state = self.state.load(Ordering::Acquire);
            let (g, jobs, next) = unpack(state);
            if g != generation || next >= jobs {
                return;
            }
            if self.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            // SAFETY: job `next` of generation `generation` was claimed, so that call has not
            // finished (it waits for `done` to count this job) and its `Job`, stored before the
            // generation was published (Release, seen through the Acquire above), is alive.
            let job = unsafe { &*self.job.load(Ordering::Acquire) };
            if let Some(h) = helper {
                self.claimed_at[h].store(self.now().max(1), Ordering::Relaxed);
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.run)(next))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            if let Some(h) = helper {
                self.claimed_at[h].store(0, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// How long the oldest job a helper is running has run (zero when none runs).
    fn oldest_helper_job(&self) -> Duration {
        let now = self.now();
        let oldest = self.claimed_at.iter().map(|c| c.load(Ordering::Relaxed)).filter(|&t| t > 0).min();
        Duration::from_nanos(oldest.map_or(0, |t| now.saturating_sub(t)))
    }
}

fn helper(shared: Arc<Shared>, index: usize) {
    let mut seen = unpack(shared.state.load(Ordering::Acquire)).0;
    loop {
        let (since, mut spins, mut patient) = (Instant::now(), 0u32, true);
        let generation = loop {
            let g = unpack(shared.state.load(Ordering::Acquire)).0;
            if g != seen || shared.stop.load(Ordering::Relaxed) {
                break Some(g);
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                let waited = since.elapsed();
                if waited > SPIN {
                    break None;
                }
                patient = waited <= PAUSE;
            }
            if patient {
                std::hint::spin_loop();
            } else {
                // Past the gap between two layers: let whatever else wants this core run.
                std::thread::yield_now();
            }
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        match generation {
            Some(g) => {
                seen = g;
                shared.work(g, Some(index));
            }
            None => {
                // Park unless a call was published meanwhile: the caller stores the state and
                // then reads `sleeping`, the helper stores `sleeping` and then reads the state
                // (both SeqCst), so one of them sees the other's store.
                shared.sleeping[index].store(true, Ordering::SeqCst);
                if unpack(shared.state.load(Ordering::SeqCst)).0 == seen && !shared.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                shared.sleeping[index].store(false, Ordering::SeqCst);
            }
        }
    }
}

impl Team {
    /// A team of `threads` (at least 1): the caller and `threads − 1` helper threads.
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        Self::start(threads, true)
    }

    /// As [`Self::new`], but a team that never backs off after a [`STALL`]: every call is split
    /// between all its threads whatever the load (what a test of the split needs).
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn always_split(threads: usize) -> std::io::Result<Self> {
        Self::start(threads, false)
    }

    fn start(threads: usize, backs_off: bool) -> std::io::Result<Self> {
        let threads = threads.max(1);
        if threads == 1 {
            return Ok(Self::sequential());
        }
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            alone_until: AtomicU64::new(0),
            backs_off,
            claimed_at: (1..threads).map(|_| AtomicU64::new(0)).collect(),
            started: Instant::now(),
            stop: AtomicBool::new(false),
        });
        let mut team = Self { threads, shared: Some(shared.clone()), helpers: Vec::new() };
        for index in 0..threads - 1 {
            let shared = shared.clone();
            // On failure `team` is dropped, which stops the helpers already started.
            let handle = std::thread::Builder::new()
                .name(format!("shrink-team-{}", index + 1))
                .spawn(move || helper(shared, index))?;
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// The team of one thread: every call runs its jobs in order on the caller.
    pub const fn sequential() -> Self {
        Self { threads: 1, shared: None, helpers: Vec::new() }
    }

    /// Threads a call may split its work between now: the team's size, or 1 while it backs off
    /// after a [`STALL`] (its calls then run on the caller alone, so a kernel should not cut
    /// its work into pieces that only pay on several threads).
    pub fn threads(&self) -> usize {
        match &self.shared {
            Some(shared) if !shared.backing_off() => self.threads,
            _ => 1,
        }
    }

    /// Threads of the team, the caller included.
    pub fn size(&self) -> usize {
        self.threads
    }

    /// Runs `run(j)` for every `j` in `0..jobs`, spread over the team, and returns when all have
    /// finished. Jobs run in no particular order, each once. A call made while another runs on
    /// the same team (from a job, or from another thread) runs its jobs in order on its caller.
    ///
    /// # Panics
    /// When a job panicked (after every other job has finished), or `jobs > MAX_JOBS`.
    pub fn run(&self, jobs: usize, run: &(dyn Fn(usize) + Sync)) {
        assert!(jobs <= MAX_JOBS, "{jobs} jobs in one call (at most {MAX_JOBS})");
        let shared = match &self.shared {
            Some(shared) if jobs > 1 => shared,
            _ => return (0..jobs).for_each(run),
        };
        if shared.backing_off() || shared.busy.swap(true, Ordering::Acquire) {
            return (0..jobs).for_each(run);
        }
        let job = Job { run };
        shared.done.store(0, Ordering::Relaxed);
        shared.panicked.store(false, Ordering::Relaxed);
        // The pointer outlives no use: helpers dereference it only for a claimed job of this
        // generation, and this call returns only once every claimed job is done.
        shared.job.store((&job as *const Job<'_>).cast_mut().cast(), Ordering::Relaxed);
        let generation = unpack(shared.state.load(Ordering::Relaxed)).0.wrapping_add(1) & 0xffff_ffff;
        shared.state.store(pack(generation, jobs, 0), Ordering::SeqCst);
        let woken = Instant::now();
        for (sleeping, helper) in shared.sleeping.iter().zip(&self.helpers) {
            if sleeping.load(Ordering::SeqCst) {
                helper.thread().unpark();
            }
        }
        // On a loaded machine, waking a helper can hand it this thread's core until the next
        // time slice: that is a stall too.
        let mut stalled = woken.elapsed() > STALL;
        let own = Instant::now();
        shared.work(generation, None);
        let since = Instant::now();
        // A helper's job that has run this long (its own jobs took the caller `own`) was
        // descheduled: a late wake-up only delays when a job starts, not how long it runs.
        let patience = STALL.max(4 * (since - own));
        let (mut spins, mut patient) = (0u32, true);
        while shared.done.load(Ordering::Acquire) < jobs {
            // A helper is inside a job: it finishes in microseconds, unless the OS has
            // descheduled it, when spinning would only keep it from running. (The clock is
            // read every 64 rounds: reading it costs more than a round.)
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && since.elapsed() > SPIN {
                patient = false;
                stalled |= shared.oldest_helper_job() > patience;
            }
            if patient {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if shared.backs_off && stalled {
            shared.alone_until.store(shared.now() + BACK_OFF.as_nanos() as u64, Ordering::Relaxed);
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        let panicked = shared.panicked.load(Ordering::Relaxed);
        shared.busy.store(false, Ordering::Release);
        assert!(!panicked, "a job of a team call panicked");
    }

    /// Splits `data` into chunks of `chunk` values (the last may be shorter) and runs
    /// `run(index, chunk)` for each, spread over the team.
    ///
    /// # Panics
    /// As [`Self::run`]; when `chunk` is 0 and `data` is not empty.
    pub fn for_each_chunk<T: Send>(&self, data: &mut [T], chunk: usize, run: &(dyn Fn(usize, &mut [T]) + Sync)) {
        if data.is_empty() {
            return;
        }
        assert!(chunk > 0, "chunks of no values");
        let (len, jobs) = (data.len(), data.len().div_ceil(chunk));
        let base = SendPtr(data.as_mut_ptr());
        self.run(jobs, &|j| {
            let start = j * chunk;
            let n = chunk.min(len - start);
            // SAFETY: chunk `j` is `start..start + n` of `data`, inside it; each job index runs
            // once, so no two jobs' chunks overlap, and `data` stays mutably borrowed (by this
            // call) until every job has finished.
            let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
            run(j, part);
        });
    }
}

impl Default for Team {
    fn default() -> Self {
        Self::sequential()
    }
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads).finish()
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.stop.store(true, Ordering::SeqCst);
            for helper in &self.helpers {
                helper.thread().unpark();
            }
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A pointer that jobs on other threads may use (each on its own part of the data).
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: `for_each_chunk` hands each job a disjoint part of a `&mut [T]` with `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_runs_once() {
        for threads in [1, 2, 3, 5] {
            let team = Team::always_split(threads).unwrap();
            assert_eq!((team.size(), team.threads()), (threads, threads));
            for jobs in [0, 1, 2, 3, 7, 64, 1000] {
                let counts: Vec<AtomicUsize> = (0..jobs).map(|_| AtomicUsize::new(0)).collect();
                team.run(jobs, &|j| {
                    counts[j].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{threads} threads, {jobs} jobs");
            }
        }
    }

    #[test]
    fn chunks_cover_the_data_once() {
        let team = Team::always_split(3).unwrap();
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 8), (1001, 17)] {
            let mut data = vec![0usize; len];
            team.for_each_chunk(&mut data, chunk, &|j, part| {
                for (i, v) in part.iter_mut().enumerate() {
                    *v += j * chunk + i + 1;
                }
            });
            assert!(data.iter().enumerate().all(|(i, &v)| v == i + 1), "len {len}, chunk {chunk}");
        }
    }

    /// Back-to-back calls, calls after the helpers have parked, and calls from inside a job
    /// (which run in order on that job's thread) all complete with every job run once.
    #[test]
    fn parked_helpers_wake_and_nested_calls_run_in_order() {
        let team = Team::new(2).unwrap();
        for round in 0..2000 {
            if round % 500 == 0 {
                std::thread::sleep(SPIN * 3);
            }
            let sum = AtomicUsize::new(0);
            team.run(4, &|j| {
                team.run(3, &|k| {
                    sum.fetch_add(j * 3 + k, Ordering::Relaxed);
                });
            });
            assert_eq!(sum.load(Ordering::Relaxed), (0..12).sum::<usize>(), "round {round}");
        }
    }

    #[test]
    fn a_panicking_job_panics_the_caller_after_the_others_finish() {
        let team = Team::new(2).unwrap();
        let finished = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(8, &|j| {
                if j == 5 {
                    panic!("job 5");
                }
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 7);
        // The team still works.
        let sum = AtomicUsize::new(0);
        team.run(10, &|j| {
            sum.fetch_add(j, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }
}
