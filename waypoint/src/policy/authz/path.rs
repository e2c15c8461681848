//! The path policies judge: the request's path normalized as RFC 3986 section 6.2.2 says
//! (percent-encoded unreserved characters decoded, then dot segments removed, section
//! 5.2.4), as Envoy normalizes paths before its RBAC filter under Istio's default
//! `pathNormalization: BASE`. Without it `/public/../admin` or `/%2e%2e/admin` would slip
//! past a DENY of `/admin*` and reach a backend that resolves them to `/admin`. As Envoy
//! does, the waypoint puts the normalized path in the request itself before routing
//! (`server::forward`), so routes and the application see it too.

use std::borrow::Cow;

/// `path` normalized; borrowed when nothing changes (the common case).
pub fn normalize(path: &str) -> Cow<'_, str> {
    if !path.contains('%') && !has_dot_segment(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    Cow::Owned(remove_dot_segments(&decoded))
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Decodes `%XX` where it encodes an unreserved character (`A-Z a-z 0-9 - . _ ~`); other
/// escapes stay as they are (decoding `%2F` would change which segments there are).
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(c) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c))
        {
            out.push(char::from(c));
            i += 3;
            continue;
        }
        // Copy one whole character (the path is a str: boundaries are known).
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + len]);
        i += len;
    }
    out
}

/// RFC 3986 section 5.2.4 on an absolute path: `.` segments dropped, `..` removes the
/// segment before it (never above the root); a path that ended in a dot segment keeps its
/// trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." => trailing_slash = i == last,
            ".." => {
                kept.pop();
                trailing_slash = i == last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn dot_segments_and_encoded_dots_are_resolved() {
        let cases = [
            ("/productpage", "/productpage"),
            ("/", "/"),
            ("/a/./b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2e/admin/%7Euser", "/admin/~user"),
            ("/a%2Fb/../c", "/c"),
            ("/a%2fb", "/a%2fb"),
            ("/%41dmin", "/Admin"),
            ("/%zz/%", "/%zz/%"),
            ("/a..b/.c", "/a..b/.c"),
            ("/ü/../é", "/é"),
            ("//admin", "//admin"),
        ];
        for (path, want) in cases {
            assert_eq!(normalize(path), want, "{path}");
        }
    }
}
