//! A pool's slots, its idle connections, and the FIFO queue of clients waiting for a slot.
//!
//! A slot given back goes straight to the longest-waiting client, with the connection
//! released in it: no client is woken to find the slot taken by another, and none overtakes
//! one that waits. One timer per queue (a task that lives while clients wait) ends the
//! waits past the wait limit and gives reserve slots to clients that have waited
//! `reserve_after`; a wait holds no timer of its own, nor a channel: its answer is left in
//! a place in the queue, reused by later waits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::sync::Notify;
// tokio's: the same clock, that tests can pause.
use tokio::time::Instant;

/// What a queue hands out, and how long a client may wait for it.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Slots (`pool_size`).
    pub size: usize,
    /// Extra slots for clients that have waited `reserve_after` (`reserve_pool_size`).
    pub reserve: usize,
    pub reserve_after: Duration,
    /// How long a client may wait (`query_wait_timeout`); `None`: for ever.
    pub wait_limit: Option<Duration>,
}

/// Which kind of slot a client holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Normal,
    Reserve,
}

/// A slot, with the idle item that came with it (the one released last, if any).
pub struct Grant<T> {
    pub slot: Slot,
    pub item: Option<T>,
}

pub struct Queue<T> {
    state: Mutex<State<T>>,
    limits: Limits,
    /// Wakes the timer when its next deadline may come sooner: a reserve slot freed up,
    /// or a client joined an empty line.
    rearm: Notify,
}

struct State<T> {
    /// Most recently used last.
    idle: Vec<T>,
    free: usize,
    free_reserve: usize,
    /// The line, longest-waiting first.
    waiters: VecDeque<Waiter>,
    /// Each waiting client's place, where its answer is left: reused from one wait to the
    /// next, so a wait allocates nothing once the line has been as long before.
    places: Slab<Place<T>>,
    timer_running: bool,
}

struct Waiter {
    place: usize,
    since: Instant,
}

enum Place<T> {
    Waiting(Waker),
    Granted(Grant<T>),
    /// The wait limit passed first.
    TimedOut,
}

impl<T: Send + 'static> Queue<T> {
    pub fn new(limits: Limits) -> Self {
        Queue {
            state: Mutex::new(State {
                idle: Vec::new(),
                free: limits.size,
                free_reserve: limits.reserve,
                waiters: VecDeque::new(),
                places: Slab::new(),
                timer_running: false,
            }),
            limits,
            rearm: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().expect("pool queue lock")
    }

    /// A free slot, with the most recently used idle item, if no client waits for one.
    pub fn try_take(&self) -> Option<Grant<T>> {
        let mut s = self.lock();
        s.take_free()
    }

    /// Waits in line, from `since`, for a slot; `None`: the wait limit passed first.
    /// Dropping the future leaves the line (what was handed to it meanwhile goes to the
    /// next client).
    pub fn wait(self: &Arc<Self>, since: Instant) -> Wait<'_, T> {
        Wait {
            queue: self,
            since,
            step: Step::Joining,
        }
    }

    /// Gives a slot back, with the item to keep idle if any: both go to the
    /// longest-waiting client if one may take the slot, else the slot is free again.
    pub fn give_back(&self, slot: Slot, item: Option<T>) {
        let waker = {
            let mut s = self.lock();
            let takes = s.waiters.front().is_some_and(|w| {
                slot == Slot::Normal || w.since.elapsed() >= self.limits.reserve_after
            });
            if takes {
                let waiter = s.waiters.pop_front().expect("a front waiter");
                s.answer(waiter.place, Place::Granted(Grant { slot, item }))
            } else {
                if let Some(item) = item {
                    s.idle.push(item);
                }
                match slot {
                    Slot::Normal => s.free += 1,
                    Slot::Reserve => {
                        s.free_reserve += 1;
                        if !s.waiters.is_empty() {
                            self.rearm.notify_one();
                        }
                    }
                }
                return;
            }
        };
        // Woken outside the lock: the client may run at once on another thread.
        waker.wake();
    }

    /// The idle items, most recently used last, for their upkeep.
    pub fn idle(&self) -> IdleGuard<'_, T> {
        IdleGuard(self.lock())
    }

    /// The most recently used idle item.
    pub fn pop_idle(&self) -> Option<T> {
        self.lock().idle.pop()
    }

    /// Clients waiting now, and how long the first has waited.
    pub fn waiting(&self) -> (usize, Option<Duration>) {
        let s = self.lock();
        (
            s.waiters.len(),
            s.waiters.front().map(|w| w.since.elapsed()),
        )
    }

    /// The queue's timer: runs while clients wait.
    async fn keep_time(self: Arc<Self>) {
        let mut woken = Vec::new();
        loop {
            let next = {
                let mut s = self.lock();
                let now = Instant::now();
                if let Some(limit) = self.limits.wait_limit {
                    while s.waiters.front().is_some_and(|w| now >= w.since + limit) {
                        let w = s.waiters.pop_front().expect("a front waiter");
                        woken.push(s.answer(w.place, Place::TimedOut));
                    }
                }
                let reserve_after = self.limits.reserve_after;
                while s.free_reserve > 0
                    && s.waiters
                        .front()
                        .is_some_and(|w| now >= w.since + reserve_after)
                {
                    s.free_reserve -= 1;
                    let w = s.waiters.pop_front().expect("a front waiter");
                    let grant = Grant {
                        slot: Slot::Reserve,
                        item: None,
                    };
                    woken.push(s.answer(w.place, Place::Granted(grant)));
                }
                match s.waiters.front() {
                    None => {
                        s.timer_running = false;
                        None
                    }
                    Some(w) => {
                        let ends = self.limits.wait_limit.map(|l| w.since + l);
                        let reserve = (s.free_reserve > 0).then_some(w.since + reserve_after);
                        Some(ends.into_iter().chain(reserve).min())
                    }
                }
            };
            woken.drain(..).for_each(Waker::wake);
            match next {
                None => return,
                Some(Some(at)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = self.rearm.notified() => {}
                },
                Some(None) => self.rearm.notified().await,
            }
        }
    }
}

impl<T> State<T> {
    fn take_free(&mut self) -> Option<Grant<T>> {
        if !self.waiters.is_empty() || self.free == 0 {
            return None;
        }
        self.free -= 1;
        Some(Grant {
            slot: Slot::Normal,
            item: self.idle.pop(),
        })
    }

    /// Leaves `answer` in the place of a client taken out of line; its waker, to wake.
    fn answer(&mut self, place: usize, answer: Place<T>) -> Waker {
        match std::mem::replace(&mut self.places[place], answer) {
            Place::Waiting(waker) => waker,
            Place::Granted(_) | Place::TimedOut => unreachable!("a client in line is waiting"),
        }
    }
}

/// The idle items under the queue's lock.
pub struct IdleGuard<'a, T>(MutexGuard<'a, State<T>>);

impl<T> std::ops::Deref for IdleGuard<'_, T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0.idle
    }
}

impl<T> std::ops::DerefMut for IdleGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0.idle
    }
}

/// A client's wait for a slot ([`Queue::wait`]): in line from its first poll until
/// answered, and out of line when dropped.
#[must_use = "a wait joins the line only when polled"]
pub struct Wait<'a, T: Send + 'static> {
    queue: &'a Arc<Queue<T>>,
    since: Instant,
    step: Step,
}

#[derive(Clone, Copy)]
enum Step {
    /// Not polled yet: not in line.
    Joining,
    /// In line; the answer comes in this place.
    InLine(usize),
    /// Answered, out of line.
    Done,
}

impl<T: Send + 'static> Future for Wait<'_, T> {
    type Output = Option<Grant<T>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let queue = self.queue;
        let mut s = queue.lock();
        match self.step {
            Step::Joining => {
                // A slot freed since `try_take`, with no one in line to hand it to.
                if let Some(free) = s.take_free() {
                    self.step = Step::Done;
                    return Poll::Ready(Some(free));
                }
                let place = s.places.insert(Place::Waiting(cx.waker().clone()));
                let first = s.waiters.is_empty();
                s.waiters.push_back(Waiter {
                    place,
                    since: self.since,
                });
                let timed = queue.limits.wait_limit.is_some() || queue.limits.reserve > 0;
                if timed && !s.timer_running {
                    s.timer_running = true;
                    tokio::spawn(queue.clone().keep_time());
                } else if timed && first {
                    // The timer may sleep for a client that has left the line since.
                    queue.rearm.notify_one();
                }
                self.step = Step::InLine(place);
                Poll::Pending
            }
            Step::InLine(place) => {
                if let Place::Waiting(waker) = &mut s.places[place] {
                    waker.clone_from(cx.waker());
                    return Poll::Pending;
                }
                self.step = Step::Done;
                match s.places.remove(place) {
                    Place::Granted(grant) => Poll::Ready(Some(grant)),
                    Place::TimedOut | Place::Waiting(_) => Poll::Ready(None),
                }
            }
            Step::Done => panic!("a pool queue wait polled after its answer"),
        }
    }
}

impl<T: Send + 'static> Drop for Wait<'_, T> {
    fn drop(&mut self) {
        let Step::InLine(place) = self.step else {
            return;
        };
        let mut s = self.queue.lock();
        match s.places.remove(place) {
            Place::Waiting(_) => {
                let at = s.waiters.iter().position(|w| w.place == place);
                s.waiters.remove(at.expect("a waiting client is in line"));
            }
            // Handed a slot meanwhile: it goes on to the next client.
            Place::Granted(grant) => {
                drop(s);
                self.queue.give_back(grant.slot, grant.item);
            }
            Place::TimedOut => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    fn queue(size: usize, reserve: usize, wait_limit: Option<u64>) -> Arc<Queue<u32>> {
        Arc::new(Queue::new(Limits {
            size,
            reserve,
            reserve_after: Duration::from_secs(5),
            wait_limit: wait_limit.map(Duration::from_secs),
        }))
    }

    /// Polls once: the wait's answer if it has one now.
    fn poll_now<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
        match std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_released_slot_goes_to_the_longest_waiting_client_with_its_connection() {
        let q = queue(1, 0, None);
        let held = q.try_take().expect("a free slot");
        assert!(held.item.is_none());
        assert!(q.try_take().is_none());
        let mut first = Box::pin(q.wait(Instant::now()));
        let mut second = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut first).is_none() && poll_now(&mut second).is_none());
        assert_eq!(q.waiting().0, 2);

        q.give_back(Slot::Normal, Some(7));
        // Nobody overtakes: not a new client, not the second one.
        assert!(q.try_take().is_none());
        assert!(poll_now(&mut second).is_none());
        let got = poll_now(&mut first).expect("handed over").expect("a slot");
        assert_eq!((got.slot, got.item), (Slot::Normal, Some(7)));
        assert_eq!(q.waiting().0, 1);

        q.give_back(Slot::Normal, None);
        let got = poll_now(&mut second).expect("handed over").expect("a slot");
        assert_eq!((got.slot, got.item), (Slot::Normal, None));
        q.give_back(Slot::Normal, Some(8));
        let free = q.try_take().expect("free again");
        assert_eq!(free.item, Some(8));
    }

    #[tokio::test]
    async fn a_client_that_leaves_the_line_passes_on_what_it_was_handed() {
        let q = queue(1, 0, None);
        let _held = q.try_take().unwrap();
        let mut leaving = Box::pin(q.wait(Instant::now()));
        let mut next = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut leaving).is_none() && poll_now(&mut next).is_none());
        // Handed the slot, gone before it looked.
        q.give_back(Slot::Normal, Some(1));
        drop(leaving);
        let got = poll_now(&mut next).expect("passed on").expect("a slot");
        assert_eq!(got.item, Some(1));

        // Gone while still in line: out of the count, and skipped.
        let mut gone = Box::pin(q.wait(Instant::now()));
        let mut after = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut gone).is_none() && poll_now(&mut after).is_none());
        drop(gone);
        assert_eq!(q.waiting().0, 1);
        q.give_back(Slot::Normal, Some(2));
        assert_eq!(poll_now(&mut after).unwrap().unwrap().item, Some(2));
    }

    #[test]
    fn a_wait_is_small_enough_to_stay_inline_in_a_lease_s_future() {
        // A queue reference, the start of the wait and its place: no box, no channel.
        assert!(std::mem::size_of::<Wait<'_, Box<u64>>>() <= 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gone_before_it_saw_its_reserve_slot_passes_it_on() {
        let q = queue(1, 1, None);
        let _held = q.try_take().unwrap();
        let mut leaving = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut leaving).is_none());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut next = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut next).is_none());
        // 5 s: the timer hands the reserve slot to the first, which has left meanwhile.
        tokio::time::sleep(Duration::from_secs(4) + Duration::from_millis(100)).await;
        drop(leaving);
        assert_eq!(q.waiting().0, 1);
        // The slot is free again and goes to the next once it has waited 5 s.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let got = poll_now(&mut next).expect("passed on").expect("a slot");
        assert_eq!(got.slot, Slot::Reserve);
        assert_eq!(q.waiting(), (0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_ends_waits_past_the_limit_in_order() {
        let q = queue(1, 0, Some(10));
        let _held = q.try_take().unwrap();
        let early = tokio::spawn({
            let q = q.clone();
            async move { q.wait(Instant::now()).await.is_some() }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        let late = tokio::spawn({
            let q = q.clone();
            async move { q.wait(Instant::now()).await.is_some() }
        });
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(early.is_finished() && !late.is_finished());
        assert!(!early.await.unwrap(), "timed out");
        assert_eq!(q.waiting().0, 1);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!late.await.unwrap(), "timed out");
        assert_eq!(q.waiting(), (0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_slots_go_to_clients_that_waited_reserve_after() {
        let q = queue(1, 1, Some(60));
        let _held = q.try_take().unwrap();
        let waiter = |q: &Arc<Queue<u32>>| {
            let q = q.clone();
            tokio::spawn(async move { q.wait(Instant::now()).await.map(|g| g.slot) })
        };
        let first = waiter(&q);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = waiter(&q);
        tokio::time::sleep(Duration::from_secs(4) + Duration::from_millis(500)).await;
        // 5.5 s: the first has waited 5 s and holds the one reserve slot.
        assert_eq!(first.await.unwrap(), Some(Slot::Reserve));
        assert!(!second.is_finished());
        // A freed reserve slot goes to the second once it has waited 5 s too.
        q.give_back(Slot::Reserve, None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!second.is_finished());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(second.await.unwrap(), Some(Slot::Reserve));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_joining_an_empty_line_gets_its_reserve_slot_on_time() {
        let q = queue(1, 1, Some(60));
        let _held = q.try_take().unwrap();
        // The reserve slot is taken first: a client that waits now has only its limit as
        // a deadline (60 s), and the timer sleeps until then.
        let reserve = q
            .wait(Instant::now())
            .await
            .expect("the reserve slot after 5 s");
        assert_eq!(reserve.slot, Slot::Reserve);
        let mut served = Box::pin(q.wait(Instant::now()));
        assert!(poll_now(&mut served).is_none());
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.give_back(Slot::Normal, None);
        assert_eq!(served.await.unwrap().slot, Slot::Normal);
        // The line is empty; the reserve slot frees up; a new client joins.
        q.give_back(Slot::Reserve, None);
        let started = Instant::now();
        let got = q.wait(Instant::now()).await.expect("a slot");
        assert_eq!(got.slot, Slot::Reserve);
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    /// Clients on two threads take slots, wait, give up while waiting, time out and give
    /// slots back at once: afterwards every slot is free again, normal and reserve alike,
    /// and nobody is left in line.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_survive_clients_that_come_leave_and_time_out_on_two_threads() {
        let q = Arc::new(Queue::new(Limits {
            size: 3,
            reserve: 1,
            reserve_after: Duration::from_millis(1),
            wait_limit: Some(Duration::from_millis(20)),
        }));
        let clients: Vec<_> = (0..48u32)
            .map(|n| {
                let q = q.clone();
                tokio::spawn(async move {
                    // xorshift: which client gives up, and when.
                    let mut r = n.wrapping_mul(2_654_435_761) | 1;
                    for _ in 0..500 {
                        r ^= r << 13;
                        r ^= r >> 17;
                        r ^= r << 5;
                        let got = match q.try_take() {
                            Some(grant) => Some(grant),
                            None if r % 4 == 0 => {
                                // Gives up after a moment, handed a slot or not: the
                                // moment is looked at first.
                                let patience = Duration::from_micros(u64::from(r % 500));
                                tokio::select! {
                                    biased;
                                    () = tokio::time::sleep(patience) => None,
                                    got = q.wait(Instant::now()) => got,
                                }
                            }
                            None => q.wait(Instant::now()).await,
                        };
                        if let Some(grant) = got {
                            for _ in 0..r % 3 {
                                tokio::task::yield_now().await;
                            }
                            q.give_back(grant.slot, grant.item.or(Some(n)));
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.expect("a client task");
        }
        assert_eq!(q.waiting(), (0, None));
        let held: Vec<_> = (0..3).map_while(|_| q.try_take()).collect();
        assert_eq!(held.len(), 3, "every normal slot is free");
        assert!(q.try_take().is_none());
        let reserve = q.wait(Instant::now()).await.expect("the reserve slot");
        assert_eq!(reserve.slot, Slot::Reserve);
        assert!(
            q.wait(Instant::now()).await.is_none(),
            "no slot beyond them"
        );
    }
}
