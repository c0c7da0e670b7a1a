//! Per-channel capacity overrides, written as globs or regexes as in `channels_redis`'s
//! `channel_capacity` setting.

use regex::Regex;

/// One capacity override: channels whose full name matches get `capacity`.
#[derive(Debug, Clone)]
pub struct CapacityRule {
    pattern: Regex,
    /// The capacity for matching channels.
    pub capacity: usize,
}

impl CapacityRule {
    /// A shell-style glob (`*`, `?`, `[…]`), matched against the whole name, like Python's
    /// `fnmatch`.
    pub fn glob(glob: &str, capacity: usize) -> Result<Self, regex::Error> {
        let mut re = String::from("^");
        let mut chars = glob.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => re.push_str(".*"),
                '?' => re.push('.'),
                '[' => {
                    let mut class = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == ']' {
                            closed = true;
                            break;
                        }
                        class.push(c);
                    }
                    if closed {
                        re.push('[');
                        if let Some(rest) = class.strip_prefix('!') {
                            re.push('^');
                            re.push_str(&rest.replace('\\', "\\\\"));
                        } else {
                            re.push_str(&class.replace('\\', "\\\\"));
                        }
                        re.push(']');
                    } else {
                        re.push_str(&regex::escape(&format!("[{class}")));
                    }
                }
                other => re.push_str(&regex::escape(&other.to_string())),
            }
        }
        re.push('$');
        Ok(CapacityRule {
            pattern: Regex::new(&re)?,
            capacity,
        })
    }

    /// A regular expression, searched in the name (like Python's `re.match` when anchored with
    /// `^`).
    pub fn regex(pattern: &str, capacity: usize) -> Result<Self, regex::Error> {
        Ok(CapacityRule {
            pattern: Regex::new(pattern)?,
            capacity,
        })
    }

    /// Whether `channel` matches this rule.
    pub fn matches(&self, channel: &str) -> bool {
        self.pattern.is_match(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        let rule = CapacityRule::glob("jobs.*", 5).unwrap();
        assert!(rule.matches("jobs.high"));
        assert!(!rule.matches("myjobs.high"));
        let rule = CapacityRule::glob("a?c[!x]", 5).unwrap();
        assert!(rule.matches("abcd"));
        assert!(!rule.matches("abcx"));
        let rule = CapacityRule::glob("a.b", 5).unwrap();
        assert!(!rule.matches("axb"), "dots are literal in globs");
    }
}
