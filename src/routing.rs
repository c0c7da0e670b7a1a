//! Path routing: `path("/ws/chat/{room}/", …)` patterns and `re_path(r"^…$", …)` regexes, tried
//! in list order (first match wins, as in Channels' `URLRouter`), with nested routers that match
//! a prefix and hand the rest of the path on.
//!
//! Patterns are compiled to regexes once, at startup. `{name}` captures one path segment;
//! `{name:conv}` picks a converter as in Django: `str` (default, `[^/]+`), `int` (`[0-9]+`),
//! `slug` (`[-a-zA-Z0-9_]+`), `uuid`, `path` (`.+`, slashes included). Django's `<conv:name>`
//! spelling is accepted too. Captured values land in the scope's params.

use regex::Regex;

/// Why a route pattern could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// A `{` or `<` without its closing bracket.
    #[error("unclosed parameter in pattern {0:?}")]
    Unclosed(String),
    /// A parameter name that is not an identifier.
    #[error("invalid parameter name {name:?} in pattern {pattern:?}")]
    BadName {
        /// The pattern.
        pattern: String,
        /// The name found.
        name: String,
    },
    /// A converter that does not exist.
    #[error(
        "unknown converter {converter:?} in pattern {pattern:?} (use str, int, slug, uuid or path)"
    )]
    UnknownConverter {
        /// The pattern.
        pattern: String,
        /// The converter found.
        converter: String,
    },
    /// The same parameter twice.
    #[error("parameter {name:?} appears twice in pattern {pattern:?}")]
    Duplicate {
        /// The pattern.
        pattern: String,
        /// The repeated name.
        name: String,
    },
    /// The regex does not compile.
    #[error("invalid regex {pattern:?}: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// What the regex engine said.
        message: String,
    },
}

/// Parameters captured from the path, in the order they appear.
pub type Params = Vec<(String, String)>;

/// What a route leads to: an endpoint, or another router for the rest of the path.
pub enum Target<E> {
    /// A consumer or handler.
    Endpoint(E),
    /// A nested router that matches what follows this route's prefix.
    Nested(Router<E>),
}

impl<E> From<Router<E>> for Target<E> {
    fn from(router: Router<E>) -> Self {
        Target::Nested(router)
    }
}

/// One route: a compiled pattern and its target.
pub struct Route<E> {
    pattern: String,
    /// Matches the whole remaining path (endpoints) or a prefix of it (nested routers).
    regex: Regex,
    target: Target<E>,
}

impl<E> std::fmt::Debug for Route<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("pattern", &self.pattern)
            .finish_non_exhaustive()
    }
}

impl<E> Route<E> {
    /// A Django-`path()`-style route; errors name the problem in the pattern.
    pub fn try_path(pattern: &str, target: impl Into<Target<E>>) -> Result<Self, RouteError> {
        let target = target.into();
        let anchored_end = matches!(target, Target::Endpoint(_));
        let re = compile_path(pattern, anchored_end)?;
        Ok(Route {
            pattern: pattern.to_owned(),
            regex: Regex::new(&re).map_err(|e| RouteError::Regex {
                pattern: pattern.to_owned(),
                message: e.to_string(),
            })?,
            target,
        })
    }

    /// A Django-`re_path()`-style route: the regex is matched at the start of the remaining path
    /// (anchor the end with `$` for endpoints); named groups become params.
    pub fn try_re_path(pattern: &str, target: impl Into<Target<E>>) -> Result<Self, RouteError> {
        let anchored = if pattern.starts_with('^') {
            pattern.to_owned()
        } else {
            format!("^(?:{pattern})")
        };
        Ok(Route {
            pattern: pattern.to_owned(),
            regex: Regex::new(&anchored).map_err(|e| RouteError::Regex {
                pattern: pattern.to_owned(),
                message: e.to_string(),
            })?,
            target: target.into(),
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// A `path()` route. Panics with the pattern error: patterns are program text, checked at
/// startup; use [`Route::try_path`] to handle the error yourself.
pub fn path<E>(pattern: &str, target: impl Into<Target<E>>) -> Route<E> {
    match Route::try_path(pattern, target) {
        Ok(route) => route,
        Err(e) => panic!("{e}"),
    }
}

/// A `re_path()` route. Panics with the regex error; see [`Route::try_re_path`].
pub fn re_path<E>(pattern: &str, target: impl Into<Target<E>>) -> Route<E> {
    match Route::try_re_path(pattern, target) {
        Ok(route) => route,
        Err(e) => panic!("{e}"),
    }
}

/// An ordered list of routes.
pub struct Router<E> {
    routes: Vec<Route<E>>,
}

impl<E> Default for Router<E> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

impl<E> std::fmt::Debug for Router<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.routes).finish()
    }
}

/// A successful match: the endpoint and the params captured on the way.
#[derive(Debug)]
pub struct Match<'a, E> {
    /// The endpoint found.
    pub endpoint: &'a E,
    /// Params from every level of nesting, outer first.
    pub params: Params,
    /// The pattern of the innermost route.
    pub pattern: &'a str,
}

impl<E> Router<E> {
    /// The same routes with every endpoint (nested ones included) passed through `f`.
    pub(crate) fn map_endpoints(self, f: impl Fn(E) -> E + Copy) -> Self {
        Router {
            routes: self
                .routes
                .into_iter()
                .map(|r| Route {
                    pattern: r.pattern,
                    regex: r.regex,
                    target: match r.target {
                        Target::Endpoint(e) => Target::Endpoint(f(e)),
                        Target::Nested(inner) => Target::Nested(inner.map_endpoints(f)),
                    },
                })
                .collect(),
        }
    }

    /// An empty router.
    pub fn new() -> Self {
        Router::default()
    }

    /// Appends a route (tried after the ones before it).
    pub fn route(mut self, route: Route<E>) -> Self {
        self.routes.push(route);
        self
    }

    /// Appends a route in place.
    pub fn push(&mut self, route: Route<E>) {
        self.routes.push(route);
    }

    /// Prepends a route in place (tried before the others).
    pub fn push_front(&mut self, route: Route<E>) {
        self.routes.insert(0, route);
    }

    /// The patterns, in order (nested ones are not expanded).
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.pattern.as_str())
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Finds the first route matching `path`.
    pub fn resolve(&self, path: &str) -> Option<Match<'_, E>> {
        let mut params = Vec::new();
        self.resolve_into(path, &mut params)
    }

    fn resolve_into(&self, path: &str, params: &mut Params) -> Option<Match<'_, E>> {
        for route in &self.routes {
            let Some(caps) = route.regex.captures(path) else {
                continue;
            };
            let mark = params.len();
            for name in route.regex.capture_names().flatten() {
                if let Some(m) = caps.name(name) {
                    params.push((name.to_owned(), m.as_str().to_owned()));
                }
            }
            let end = caps.get(0).map_or(0, |m| m.end());
            match &route.target {
                Target::Endpoint(endpoint) => {
                    return Some(Match {
                        endpoint,
                        params: std::mem::take(params),
                        pattern: &route.pattern,
                    });
                }
                Target::Nested(inner) => {
                    if let Some(found) = inner.resolve_into(&path[end..], params) {
                        return Some(found);
                    }
                    params.truncate(mark);
                }
            }
        }
        None
    }
}

fn converter_regex(conv: &str) -> Option<&'static str> {
    Some(match conv {
        "str" => "[^/]+",
        "int" => "[0-9]+",
        "slug" => "[-a-zA-Z0-9_]+",
        "uuid" => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "path" => ".+",
        _ => return None,
    })
}

fn valid_ident(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn compile_path(pattern: &str, anchored_end: bool) -> Result<String, RouteError> {
    let mut re = String::from("^");
    let mut names: Vec<String> = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find(['{', '<']) {
        re.push_str(&regex::escape(&rest[..open]));
        let close_char = if rest.as_bytes()[open] == b'{' {
            '}'
        } else {
            '>'
        };
        let after = &rest[open + 1..];
        let close = after
            .find(close_char)
            .ok_or_else(|| RouteError::Unclosed(pattern.to_owned()))?;
        let inner = &after[..close];
        // `{name:conv}` or Django's `<conv:name>`.
        let (name, conv) = match inner.split_once(':') {
            None => (inner, "str"),
            Some((name, conv)) if close_char == '}' => (name, conv),
            Some((conv, name)) => (name, conv),
        };
        if !valid_ident(name) {
            return Err(RouteError::BadName {
                pattern: pattern.to_owned(),
                name: name.to_owned(),
            });
        }
        if names.iter().any(|n| n == name) {
            return Err(RouteError::Duplicate {
                pattern: pattern.to_owned(),
                name: name.to_owned(),
            });
        }
        let class = converter_regex(conv).ok_or_else(|| RouteError::UnknownConverter {
            pattern: pattern.to_owned(),
            converter: conv.to_owned(),
        })?;
        re.push_str(&format!("(?P<{name}>{class})"));
        names.push(name.to_owned());
        rest = &after[close + 1..];
    }
    re.push_str(&regex::escape(rest));
    if anchored_end {
        re.push('$');
    }
    Ok(re)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        Router::new()
            .route(path("/ws/echo/", Target::Endpoint("echo")))
            .route(path("/ws/chat/{room}/", Target::Endpoint("chat")))
            .route(re_path(
                r"^/ws/re/(?P<year>[0-9]{4})/$",
                Target::Endpoint("re"),
            ))
            .route(path(
                "/api/",
                Router::new()
                    .route(path("items/{id:int}", Target::Endpoint("item")))
                    .route(path("<slug:name>/", Target::Endpoint("slug"))),
            ))
            .route(path("/files/{rest:path}", Target::Endpoint("files")))
            .route(path("/ws/chat/lobby/", Target::Endpoint("never")))
    }

    #[test]
    fn first_match_in_list_order() {
        let r = router();
        let m = r.resolve("/ws/chat/lobby/").unwrap();
        assert_eq!(
            *m.endpoint, "chat",
            "the earlier pattern wins, as in Channels"
        );
        assert_eq!(m.params, vec![("room".to_owned(), "lobby".to_owned())]);
    }

    #[test]
    fn patterns_converters_and_regexes() {
        let r = router();
        assert_eq!(*r.resolve("/ws/echo/").unwrap().endpoint, "echo");
        assert!(r.resolve("/ws/echo").is_none());
        assert!(r.resolve("/ws/echo/x").is_none());
        assert!(r.resolve("/ws/chat/a/b/").is_none(), "str stops at slashes");
        let m = r.resolve("/ws/re/2024/").unwrap();
        assert_eq!(m.params, vec![("year".to_owned(), "2024".to_owned())]);
        assert!(r.resolve("/ws/re/24/").is_none());
        let m = r.resolve("/files/a/b/c.txt").unwrap();
        assert_eq!(m.params[0].1, "a/b/c.txt");
    }

    #[test]
    fn nested_routers_strip_the_prefix() {
        let r = router();
        let m = r.resolve("/api/items/42").unwrap();
        assert_eq!(*m.endpoint, "item");
        assert_eq!(m.params, vec![("id".to_owned(), "42".to_owned())]);
        assert!(
            r.resolve("/api/items/x").is_none()
                || *r.resolve("/api/items/x").unwrap().endpoint != "item"
        );
        assert_eq!(*r.resolve("/api/some-slug/").unwrap().endpoint, "slug");
        assert!(r.resolve("/nothing").is_none());
    }

    #[test]
    fn literal_text_is_escaped() {
        let r: Router<&str> = Router::new().route(path("/a.b/", Target::Endpoint("x")));
        assert!(r.resolve("/a.b/").is_some());
        assert!(r.resolve("/aXb/").is_none());
    }

    #[test]
    fn bad_patterns_are_typed_errors() {
        let e = |p: &str| Route::try_path(p, Target::Endpoint(())).unwrap_err();
        assert!(matches!(e("/a/{room"), RouteError::Unclosed(_)));
        assert!(matches!(e("/a/{1x}"), RouteError::BadName { .. }));
        assert!(matches!(
            e("/a/{x:float}"),
            RouteError::UnknownConverter { .. }
        ));
        assert!(matches!(e("/{x}/{x}"), RouteError::Duplicate { .. }));
        assert!(matches!(
            Route::try_re_path("(", Target::Endpoint(())).unwrap_err(),
            RouteError::Regex { .. }
        ));
    }
}
