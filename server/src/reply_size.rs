//! Replies that fit: no reply is ever larger than `max_message_bytes`, so
//! any client that sizes its buffer from `welcome` reads every reply whole,
//! and no request can get its own connection dropped by the size of the
//! answer.
//!
//! - Lists that grow with the server's state (`children`, `killed`) are
//!   sent as pages with the same id, each marked `more` but the last
//!   ([`pages`]).
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

/// Splits `items` into pages whose encoding fits in `max` bytes with the
/// envelope. Always at least one page (an empty one for no items).
pub(crate) fn pages<T: Serialize>(items: Vec<T>, max: usize) -> Vec<Vec<T>> {
    let budget = max.saturating_sub(ENVELOPE);
    let mut pages = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let size = encode(&item).map_or(budget, |bytes| bytes.len());
        let page = pages.last_mut().expect("there is always a page");
        if !page.is_empty() && used + size > budget {
            pages.push(Vec::new());
            used = 0;
        }
        used += size;
        pages.last_mut().expect("just pushed").push(item);
    }
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
