//! Errors as a client reads them: the message of each error in a `source()`
//! chain, outermost first (errors here keep their cause as their source
//! instead of repeating its text).

use std::error::Error;

/// `outer: cause: root cause`.
pub fn chain(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // A wrapper that shows its cause already (`#[error(transparent)]`).
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or
/// a `String`; anything else is named as such).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_either_payload() {
        let of = |f: fn()| panic_message(&*std::panic::catch_unwind(f).unwrap_err());
        assert_eq!(of(|| panic!("plain")), "plain");
        assert_eq!(of(|| panic!("formatted {}", 1)), "formatted 1");
        assert_eq!(
            of(|| std::panic::panic_any(7_u8)),
            "a panic without a message"
        );
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("worker 1 failed")
        }
    }

    impl Error for Outer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_follow_the_outer_message() {
        let error = Outer(std::io::Error::other("connection refused"));
        assert_eq!(chain(&error), "worker 1 failed: connection refused");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
