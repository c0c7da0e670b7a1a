//! Channel and group name rules, as Channels checks them.
//!
//! Names are ASCII letters, digits, `-`, `_` and `.`, shorter than 100 characters. A channel name
//! may carry one `!`: the part up to and including it names a process, the rest a channel inside
//! that process (`specific.<process>!<conn>`). Python's `\w` also admits non-ASCII letters after
//! the `!`; canal is stricter and ASCII-only everywhere, so every name it accepts Python accepts.

/// Names must be shorter than this (Channels checks `len(name) < 100`).
pub const MAX_NAME_LENGTH: usize = 100;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    /// The name is empty.
    Empty,
    /// The name has 100 characters or more.
    TooLong,
    /// The name holds a character outside `A-Za-z0-9-_.` (and `!` for channels).
    BadCharacter,
    /// More than one `!`, or a `!` with nothing before it, or a `!` in a group name.
    BadBang,
}

impl std::fmt::Display for NameProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameProblem::Empty => "is empty",
            NameProblem::TooLong => "must be shorter than 100 characters",
            NameProblem::BadCharacter => {
                "may only contain ASCII letters, digits, '-', '_' and '.' (and one '!' in channel names)"
            }
            NameProblem::BadBang => {
                "may contain at most one '!', after at least one other character"
            }
        })
    }
}

fn plain_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Checks a channel name: `^[a-zA-Z\d\-_.]+(![a-zA-Z\d\-_.]*)?$`, under 100 characters.
pub fn check_channel_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() >= MAX_NAME_LENGTH {
        return Err(NameProblem::TooLong);
    }
    let mut bang = None;
    for (i, b) in name.bytes().enumerate() {
        if b == b'!' {
            if bang.is_some() || i == 0 {
                return Err(NameProblem::BadBang);
            }
            bang = Some(i);
        } else if !plain_char(b) {
            return Err(NameProblem::BadCharacter);
        }
    }
    Ok(())
}

/// Checks a group name: `^[a-zA-Z\d\-_.]+$`, under 100 characters.
pub fn check_group_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() >= MAX_NAME_LENGTH {
        return Err(NameProblem::TooLong);
    }
    for b in name.bytes() {
        if b == b'!' {
            return Err(NameProblem::BadBang);
        }
        if !plain_char(b) {
            return Err(NameProblem::BadCharacter);
        }
    }
    Ok(())
}

/// The part of a process-local name up to and including the `!` (`specific.abc!` for
/// `specific.abc!42`); the whole name for other channels.
pub fn non_local_name(name: &str) -> &str {
    match name.find('!') {
        Some(i) => &name[..=i],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_channels_rules() {
        let cases: &[(&str, Result<(), NameProblem>)] = &[
            ("chat", Ok(())),
            ("http.request", Ok(())),
            ("a-b_c.d", Ok(())),
            ("specific.abc!def", Ok(())),
            ("specific.abc!", Ok(())),
            ("", Err(NameProblem::Empty)),
            ("!abc", Err(NameProblem::BadBang)),
            ("a!b!c", Err(NameProblem::BadBang)),
            ("has space", Err(NameProblem::BadCharacter)),
            ("émoji", Err(NameProblem::BadCharacter)),
            ("a?b", Err(NameProblem::BadCharacter)),
            ("a/b", Err(NameProblem::BadCharacter)),
            ("line\nfeed", Err(NameProblem::BadCharacter)),
        ];
        for (name, want) in cases {
            assert_eq!(check_channel_name(name), *want, "{name:?}");
        }
        assert_eq!(check_channel_name(&"a".repeat(99)), Ok(()));
        assert_eq!(
            check_channel_name(&"a".repeat(100)),
            Err(NameProblem::TooLong)
        );
    }

    #[test]
    fn group_names_follow_channels_rules() {
        assert_eq!(check_group_name("chat"), Ok(()));
        assert_eq!(check_group_name("room-1.a_b"), Ok(()));
        assert_eq!(check_group_name("a!b"), Err(NameProblem::BadBang));
        assert_eq!(check_group_name(""), Err(NameProblem::Empty));
        assert_eq!(check_group_name("a b"), Err(NameProblem::BadCharacter));
        assert_eq!(check_group_name(&"g".repeat(99)), Ok(()));
        assert_eq!(
            check_group_name(&"g".repeat(100)),
            Err(NameProblem::TooLong)
        );
    }

    #[test]
    fn non_local_part() {
        assert_eq!(non_local_name("specific.abc!def"), "specific.abc!");
        assert_eq!(non_local_name("jobs"), "jobs");
    }
}
