//! Batches of requests with one result per item, and linked chains (as in TigerBeetle):
//! an item marked `linked` succeeds or fails together with the item after it, so a run
//! of linked items closed by an unlinked one is all-or-nothing. Unlinked items stand
//! alone: a refused one fails by itself and the others are applied.

use std::ops::Range;

use crate::error::{InvalidInput, LedgerError};

/// The most items one batch call takes: enough to amortise a commit over thousands of
/// movements, small enough that one transaction's locks and memory stay bounded.
pub const MAX_BATCH_ITEMS: usize = 10_000;

/// One request of a batch, and whether it is linked to the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item<T> {
    /// The request itself (a transfer, ...), idempotent under its own key.
    pub request: T,
    /// Applied only if the next item is applied too (and so on to the chain's end).
    pub linked: bool,
}

impl<T> Item<T> {
    /// An item standing alone.
    pub fn single(request: T) -> Item<T> {
        Item { request, linked: false }
    }

    /// An item linked to the next one.
    pub fn linked(request: T) -> Item<T> {
        Item { request, linked: true }
    }
}

impl<T> From<T> for Item<T> {
    fn from(request: T) -> Item<T> {
        Item::single(request)
    }
}

/// One chain of a batch: the items' index range, and whether the batch ended before
/// the chain was closed (its last item is marked linked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The chain's items, as indexes into the batch.
    pub items: Range<usize>,
    /// The batch's last item is marked linked: the chain was never closed, and all of
    /// its items are refused ([`LedgerError::LinkedChainOpen`]).
    pub open: bool,
}

/// The batch cut into chains, in order. An unlinked item is a chain of one.
pub fn chains<T>(items: &[Item<T>]) -> Vec<Chain> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, item) in items.iter().enumerate() {
        if !item.linked {
            out.push(Chain { items: start..i + 1, open: false });
            start = i + 1;
        }
    }
    if start < items.len() {
        out.push(Chain { items: start..items.len(), open: true });
    }
    out
}

/// Refuses a batch that is larger than [`MAX_BATCH_ITEMS`] before anything is read or
/// written.
pub fn check_size<T>(items: &[Item<T>]) -> Result<(), LedgerError> {
    if items.len() > MAX_BATCH_ITEMS {
        return Err(LedgerError::Invalid(InvalidInput::BadField {
            field: "batch",
            reason: format!("{} items; at most {MAX_BATCH_ITEMS} per call", items.len()),
        }));
    }
    Ok(())
}

/// The results of one chain whose item `failed` was refused with `error`: that item
/// keeps its own refusal, every other item of the chain is refused for its sake.
pub fn fail_chain<R>(chain: &Range<usize>, failed: usize, error: LedgerError) -> Vec<Result<R, LedgerError>> {
    let mut error = Some(error);
    chain
        .clone()
        .map(|i| {
            if i == failed {
                Err(error.take().expect("one failed item per chain"))
            } else {
                Err(LedgerError::LinkedItemFailed { failed })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(linked: &[bool]) -> Vec<Item<()>> {
        linked.iter().map(|&l| Item { request: (), linked: l }).collect()
    }

    /// Batches as (each item's `linked` flag) -> the chains they make.
    #[test]
    fn a_batch_is_cut_into_chains_closed_by_an_unlinked_item() {
        let c = |r: Range<usize>, open| Chain { items: r, open };
        let table: &[(&[bool], Vec<Chain>)] = &[
            (&[], vec![]),
            (&[false], vec![c(0..1, false)]),
            (&[false, false], vec![c(0..1, false), c(1..2, false)]),
            (&[true, false], vec![c(0..2, false)]),
            (&[true, true, false, false], vec![c(0..3, false), c(3..4, false)]),
            (&[false, true], vec![c(0..1, false), c(1..2, true)]),
            (&[true], vec![c(0..1, true)]),
            (&[true, false, true, true], vec![c(0..2, false), c(2..4, true)]),
        ];
        for (linked, expected) in table {
            assert_eq!(&chains(&batch(linked)), expected, "linked flags {linked:?}");
        }
    }

    #[test]
    fn a_failed_chain_keeps_its_own_refusal_and_fails_the_rest_for_it() {
        let results = fail_chain::<()>(&(3..6), 4, LedgerError::SameAccount(crate::AccountId::from_db(9)));
        let codes: Vec<&str> = results.iter().map(|r| r.as_ref().unwrap_err().code()).collect();
        assert_eq!(codes, ["linked_item_failed", "same_account", "linked_item_failed"]);
        assert!(matches!(results[0], Err(LedgerError::LinkedItemFailed { failed: 4 })));
    }

    #[test]
    fn a_batch_over_the_limit_is_refused_and_one_at_the_limit_is_not() {
        assert!(check_size(&vec![Item::single(()); MAX_BATCH_ITEMS]).is_ok());
        let err = check_size(&vec![Item::single(()); MAX_BATCH_ITEMS + 1]).unwrap_err();
        assert_eq!(err.code(), "invalid_input");
        assert!(err.to_string().contains("at most 10000"), "{err}");
    }
}
