//! Which waiting messages are strangers' (their sender held no contact token of the receiver):
//! never written, held in memory by each store, by receiving account, so that a send counts the
//! stranger pools of its receiver's devices from the receiver's few positions, not from every
//! stranger's message the node holds.

use std::collections::{HashMap, HashSet};

/// Positions of strangers' messages this store stored, kept for the other nodes at most: past it
/// the oldest are dropped (the other nodes then count fewer strangers' copies than there are, as
/// a node does after a restart).
const NEW_MAX: usize = 10_000;

/// The strangers' messages held, by queue position and by receiving account.
#[derive(Debug, Default)]
pub(super) struct Strangers {
    receiver_of: HashMap<i64, i64>,
    by_receiver: HashMap<i64, HashSet<i64>>,
    /// Stored by this store since the other nodes were last told: (position, receiver).
    new: Vec<(i64, i64)>,
}

impl Strangers {
    /// Notes the message at `position`, for the account `receiver`, as a stranger's; `ours` if
    /// this store stored it (the other nodes are then told).
    pub(super) fn note(&mut self, position: i64, receiver: i64, ours: bool) {
        self.receiver_of.insert(position, receiver);
        self.by_receiver
            .entry(receiver)
            .or_default()
            .insert(position);
        if ours {
            if self.new.len() >= NEW_MAX {
                self.new.remove(0);
            }
            self.new.push((position, receiver));
        }
    }

    /// The positions of strangers' messages to `receiver`.
    pub(super) fn of(&self, receiver: i64) -> Vec<i64> {
        self.by_receiver
            .get(&receiver)
            .map(|positions| positions.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every position held.
    pub(super) fn all(&self) -> Vec<i64> {
        self.receiver_of.keys().copied().collect()
    }

    /// Forgets the messages at `positions` (gone).
    pub(super) fn forget(&mut self, positions: &[i64]) {
        for position in positions {
            if let Some(receiver) = self.receiver_of.remove(position) {
                if let Some(held) = self.by_receiver.get_mut(&receiver) {
                    held.remove(position);
                    if held.is_empty() {
                        self.by_receiver.remove(&receiver);
                    }
                }
            }
        }
    }

    /// What this store stored since the last call.
    pub(super) fn take_new(&mut self) -> Vec<(i64, i64)> {
        std::mem::take(&mut self.new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_held_by_receiver_and_forgotten_once() {
        let mut strangers = Strangers::default();
        strangers.note(1, 10, true);
        strangers.note(2, 10, false);
        strangers.note(3, 20, true);
        let mut of_ten = strangers.of(10);
        of_ten.sort_unstable();
        assert_eq!(of_ten, [1, 2]);
        assert_eq!(strangers.take_new(), [(1, 10), (3, 20)]);
        assert!(strangers.take_new().is_empty());
        strangers.forget(&[1, 3, 99]);
        assert_eq!(strangers.of(10), [2]);
        assert!(strangers.of(20).is_empty());
        assert_eq!(strangers.all(), [2]);
    }
}
