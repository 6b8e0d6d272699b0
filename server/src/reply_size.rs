//! Replies that fit: no reply is ever larger than `max_message_bytes`, so
//! any client that sizes its buffer from `welcome` reads every reply whole,
//! and no request can get its own connection dropped by the size of the
//! answer.
//!
//! - Lists that grow with the server's state (`children`, `killed`) are
//!   sent as pages with the same id, each marked `more` but the last
//!   ([`pages`]; `children` a [`Page`] at a time, each made once the one
//!   before it left the queue).
//! - Texts are cut ([`cut_text`]) with a marker saying how much was cut:
//!   error messages, and a child's `target` in `children`.
//! - `status` and `welcome` lose list entries from the end and say
//!   `truncated` ([`fit`]).

use forkserver_protocol::{encode, ServerMessage};
use serde::Serialize;

/// Longest error text or child target sent, in bytes (before the marker).
pub(crate) const TEXT_MAX: usize = 4096;

/// Room left in a page for its envelope (type, id, `more`, map headers).
const ENVELOPE: usize = 128;

/// `welcome` is read before the client knows the limits, with a buffer of
/// the default `max_message_bytes`.
pub(crate) const WELCOME_MAX: usize = 65536;

/// Cuts `text` to at most `max` bytes (on a character boundary), marking
/// the cut.
pub(crate) fn cut_text(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… [{cut} bytes cut]"));
}

/// One page of a list being filled: items are taken while their encoding
/// fits in `max` bytes with the envelope; the first always fits (an item
/// is never larger than a page: texts in it are cut).
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    used: usize,
    budget: usize,
}

impl<T: Serialize> Page<T> {
    pub(crate) fn new(max: usize) -> Page<T> {
        Page {
            items: Vec::new(),
            used: 0,
            budget: max.saturating_sub(ENVELOPE),
        }
    }

    /// Adds `item`, or gives it back if the page is full.
    pub(crate) fn push(&mut self, item: T) -> Result<(), T> {
        let size = encode(&item).map_or(self.budget, |bytes| bytes.len());
        if !self.items.is_empty() && self.used + size > self.budget {
            return Err(item);
        }
        self.used += size;
        self.items.push(item);
        Ok(())
    }
}

/// Splits `items` into pages whose encoding fits in `max` bytes with the
/// envelope. Always at least one page (an empty one for no items).
pub(crate) fn pages<T: Serialize>(items: Vec<T>, max: usize) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut page = Page::new(max);
    for item in items {
        if let Err(item) = page.push(item) {
            pages.push(std::mem::replace(&mut page, Page::new(max)).items);
            page.push(item).ok().expect("an empty page takes any item");
        }
    }
    pages.push(page.items);
    pages
}

/// The messages for a paged list: `page(items, more)` for each page,
/// `more` on all but the last.
pub(crate) fn paged<T: Serialize>(
    items: Vec<T>,
    max: usize,
    page: impl Fn(Vec<T>, bool) -> ServerMessage,
) -> Vec<ServerMessage> {
    let pages = pages(items, max);
    let last = pages.len() - 1;
    pages
        .into_iter()
        .enumerate()
        .map(|(i, items)| page(items, i < last))
        .collect()
}

/// Shrinks `message` until its encoding fits in `max` bytes: texts are
/// cut, `status` and `welcome` lists lose entries from the end and say
/// `truncated`. None if it cannot be made to fit (a bug: the caller sends
/// an error in its place and logs it).
pub(crate) fn fit(mut message: ServerMessage, max: usize) -> Option<ServerMessage> {
    loop {
        let size = encode(&message).ok()?.len();
        if size <= max {
            return Some(message);
        }
        let over = size - max;
        match &mut message {
            ServerMessage::Error { message: text, .. }
            | ServerMessage::SpawnFailed { message: text, .. } => {
                // The marker adds up to ~25 bytes.
                let keep = text.len().checked_sub(over + 32)?;
                cut_text(text, keep);
            }
            ServerMessage::Status(report) => {
                report.truncated = true;
                if report.workers.pop().is_none()
                    && report.modules.pop().is_none()
                    && report.pools.pop().is_none()
                {
                    return None;
                }
            }
            ServerMessage::Welcome {
                workers,
                modules,
                truncated,
                ..
            } => {
                *truncated = true;
                if workers.pop().is_none() && modules.pop().is_none() {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkserver_protocol::ErrorKind;

    #[test]
    fn texts_are_cut_on_a_character_boundary_with_a_marker() {
        let mut text = "é".repeat(10);
        cut_text(&mut text, 5);
        assert_eq!(text, "éé… [16 bytes cut]");
        let mut short = String::from("short");
        cut_text(&mut short, 5);
        assert_eq!(short, "short");
    }

    #[test]
    fn pages_fit_and_keep_every_item_in_order() {
        let items: Vec<String> = (0..1000)
            .map(|i| format!("{i:04}{}", "x".repeat(100)))
            .collect();
        let pages = pages(items.clone(), 4096);
        assert!(pages.len() > 20);
        for page in &pages {
            assert!(encode(page).unwrap().len() + ENVELOPE <= 4096);
        }
        assert_eq!(pages.concat(), items);
        assert_eq!(
            super::pages(Vec::<String>::new(), 4096),
            vec![Vec::<String>::new()]
        );
    }

    #[test]
    fn an_oversize_error_is_cut_to_fit() {
        let error = ServerMessage::Error {
            id: Some(1),
            kind: ErrorKind::Invalid,
            message: "y".repeat(100_000),
            fatal: false,
        };
        let fitted = fit(error, 1000).unwrap();
        assert!(encode(&fitted).unwrap().len() <= 1000);
        let ServerMessage::Error { message, .. } = fitted else {
            unreachable!()
        };
        assert!(message.ends_with("bytes cut]"), "{message}");
    }
}
