//! Sessions' cookies (docs/behaviour.md, "Cookies"): a jar per session, given to its
//! downloads, stored whenever it changed, switched off (and emptied) on request, deleted
//! with the session.

use std::sync::Arc;

use tracing::{info, warn};

use super::requests::{Answer, Handled};
use super::{After, Core, CoreMsg};
use crate::conn::ConnId;
use crate::engine::cookies::CookieJar;
use crate::model::SessionKey;
use crate::store::{JarJson, Op};
use dlsession_proto::{ErrorCode, ErrorInfo, Response, SessionCookies};

impl Core {
    /// A jar for session `key` holding `stored` (its JSON), which tells the core when it
    /// changes.
    pub(super) fn new_jar(&self, key: SessionKey, stored: Option<&str>) -> Arc<CookieJar> {
        let tx = self.tx.clone();
        let (jar, error) = CookieJar::load(stored, move || {
            let _ = tx.send(CoreMsg::CookiesChanged(key));
        });
        if let Some(e) = error {
            warn!(session = %self.sessions.identifier(key), error = %e, "the stored cookies cannot be read; starting with none");
        }
        Arc::new(jar)
    }

    /// Gives every restored session its jar: the stored one, none if it keeps no cookies,
    /// an empty one if it never had any.
    pub(super) fn restore_cookies(&mut self, jars: Vec<(SessionKey, bool, JarJson)>) {
        let mut stored: std::collections::HashMap<SessionKey, (bool, String)> =
            jars.into_iter().map(|(k, enabled, jar)| (k, (enabled, jar.0))).collect();
        let keys: Vec<SessionKey> = self.sessions.keys().collect();
        for key in keys {
            let jar = match stored.remove(&key) {
                Some((false, _)) => None,
                Some((true, json)) => Some(self.new_jar(key, Some(&json))),
                None => Some(self.new_jar(key, None)),
            };
            if let Some(s) = self.sessions.get_mut(&key) {
                s.cookies = jar;
            }
        }
    }

    /// A new session keeps cookies.
    pub(super) fn give_jar(&mut self, key: SessionKey) {
        let jar = self.new_jar(key, None);
        if let Some(s) = self.sessions.get_mut(&key) {
            s.cookies = Some(jar);
        }
    }

    pub(super) fn on_cookies_changed(&mut self, key: SessionKey) {
        // A jar switched off meanwhile is not stored again.
        let Some(jar) = self.sessions.get(&key).and_then(|s| s.cookies.clone()) else { return };
        self.commit(vec![Op::SaveCookies { session: key, enabled: true, jar: JarJson(jar.to_json()) }], Vec::new());
    }

    pub(super) fn set_session_cookies(&mut self, conn: ConnId, id: u64, identifier: &str, enabled: bool) -> Handled {
        let key = self.sessions.key_of(identifier)?;
        let Some(keeps) = self.sessions.get(&key).map(|s| s.cookies.is_some()) else {
            return Err(ErrorInfo::new(ErrorCode::NoSuchSession, format!("no session {identifier:?}")));
        };
        // Already so: nothing to store (and the cookies it holds stay), so it is answered even
        // while the database refuses writes (an app attaching as before).
        if keeps == enabled {
            return self.ok_unchanged(conn, id);
        }
        if let Some(e) = &self.life.storage {
            return Err(e.clone());
        }
        let jar = enabled.then(|| self.new_jar(key, None));
        if let Some(s) = self.sessions.get_mut(&key) {
            s.cookies = jar;
        }
        info!(session = %identifier, enabled, "session cookies switched");
        let op = Op::SaveCookies { session: key, enabled, jar: JarJson("[]".into()) };
        self.commit(vec![op], vec![After::Reply { conn, id, response: Response::Ok }]);
        Ok(Answer::Later)
    }

    pub(super) fn session_cookies(&self, identifier: &str) -> Result<SessionCookies, ErrorInfo> {
        let key = self.sessions.key_of(identifier)?;
        let jar = self.sessions.get(&key).and_then(|s| s.cookies.as_ref());
        Ok(SessionCookies {
            enabled: jar.is_some(),
            stored: jar.map_or(0, |j| u32::try_from(j.unexpired()).unwrap_or(u32::MAX)),
        })
    }
}
