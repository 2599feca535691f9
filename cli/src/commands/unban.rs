//! `pushctl unban <user>`: POST /admin/unban. Lifts a ban set by `kick --ban` on every node.

use pushd_wire::{Coverage, UnbanAnswer};
use serde::Serialize;

use super::{Outcome, show};
use crate::client::Client;

#[derive(Debug, Serialize)]
struct UnbanRequest<'a> {
    user: &'a str,
}

pub async fn run(client: &Client, json: bool, user: &str) -> anyhow::Result<Outcome> {
    let fetched = client.post::<UnbanAnswer>(&["admin", "unban"], &UnbanRequest { user }, false).await?;
    show(&fetched, json, &Coverage::default(), render)
}

pub fn render(a: &UnbanAnswer) -> String {
    if a.was_banned {
        format!("unbanned {}: every node lets them in again", a.user)
    } else {
        format!("{} was not banned", a.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unban_lines_say_what_changed() {
        let a = UnbanAnswer { user: "u7".into(), was_banned: true };
        assert_eq!(render(&a), "unbanned u7: every node lets them in again");
        assert_eq!(render(&UnbanAnswer { was_banned: false, ..a }), "u7 was not banned");
    }
}
