//! `notes`: an example upstream MCP server that keeps short text notes in
//! memory, isolated per caller.
//!
//! The caller is the `sub` claim of the JWT in the `X-MCP-Marketplace-Token`
//! request header (which the marketplace gateway adds to every upstream call),
//! or "anonymous" when the header is absent. A header that is present but is
//! not a JWT with a string `sub` claim makes every tool fail with an error
//! result rather than silently falling back to the anonymous notebook.
//!
//! Tools (all results carry structured content and its JSON as text):
//! * `add_note` `{title, body, tags?: [string]}` → the stored [`Note`].
//! * `list_notes` `{tag?}` → [`NoteList`] of the caller's notes, oldest first,
//!   optionally only those carrying `tag` (case-insensitive).
//! * `search_notes` `{query}` → [`NoteList`] of notes whose title or body
//!   contains `query` (case-insensitive substring).
//! * `get_note` `{id}` → the [`Note`].
//! * `delete_note` `{id}` → [`DeletedNote`].
//!
//! Invalid input (limits below, empty title or query) and unknown ids give a
//! tool result with `isError: true` and a sentence explaining what to do.

use std::sync::Arc;

use base64::Engine as _;
use dashmap::DashMap;
use rmcp::{
    RoleServer, ServerHandler,
    handler::server::{router::tool::ToolRouter, tool::schema_for_output, wrapper::Parameters},
    model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig},
    schemars,
    service::RequestContext,
    tool, tool_handler, tool_router,
};
use serde::{Deserialize, Serialize};

/// Request header carrying the caller's identity token (a JWT).
pub const TOKEN_HEADER: &str = "x-mcp-marketplace-token";
/// Maximum length of a note title, in Unicode characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Maximum size of a note body, in bytes of UTF-8 (64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Maximum number of notes one caller may keep.
pub const MAX_NOTES_PER_CALLER: usize = 1000;
/// Maximum number of distinct tags on one note.
pub const MAX_TAGS: usize = 32;
/// Maximum length of one tag, in Unicode characters.
pub const MAX_TAG_CHARS: usize = 64;

/// A stored note, as returned in structured content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Note {
    /// Unique id (a UUID v7, so ids sort by creation time).
    pub id: String,
    /// Title, trimmed, 1 to 200 characters.
    pub title: String,
    /// Body text, up to 64 KiB.
    pub body: String,
    /// Tags, trimmed and de-duplicated case-insensitively, in the given order.
    pub tags: Vec<String>,
    /// Creation time, RFC 3339 in UTC with millisecond precision.
    pub created_at: String,
}

/// Structured content of `list_notes` and `search_notes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NoteList {
    /// Number of notes in `notes`.
    pub count: usize,
    /// The matching notes, oldest first.
    pub notes: Vec<Note>,
}

/// Structured content of `delete_note`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeletedNote {
    /// The note that was removed.
    pub deleted: Note,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct AddNoteArgs {
    /// Short title, 1 to 200 characters.
    title: String,
    /// Note text, up to 64 KiB (may be empty).
    body: String,
    /// Optional tags for filtering with list_notes (at most 32, each up to 64
    /// characters).
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
struct ListNotesArgs {
    /// Only return notes carrying this tag (case-insensitive). Omit for all notes.
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct SearchNotesArgs {
    /// Text to look for in titles and bodies (case-insensitive substring).
    query: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct NoteIdArgs {
    /// The note id, as returned by add_note, list_notes or search_notes.
    id: String,
}

/// Whose notebook a request reads and writes. A distinct variant for
/// anonymous callers keeps them apart from a token whose `sub` happens to be
/// "anonymous".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Caller {
    Anonymous,
    Subject(String),
}

/// Returns the `sub` claim of a compact JWT, if it has a non-empty string one.
///
/// The signature is deliberately NOT verified: this is an example upstream
/// that trusts the gateway in front of it (which verified the user and, with
/// a secret configured, proved itself via `X-MCP-Marketplace-Secret`). A real
/// upstream should verify the token against the gateway's public key.
fn jwt_subject(token: &str) -> Option<String> {
    let mut segments = token.split('.');
    let (_header, payload, _signature) = (segments.next()?, segments.next()?, segments.next()?);
    if segments.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let subject = claims.get("sub")?.as_str()?.trim();
    (!subject.is_empty()).then(|| subject.to_owned())
}

/// Identifies the caller from the HTTP request rmcp attached to the context.
/// Requests that did not come over HTTP (no `Parts`) are anonymous.
fn caller_of(context: &RequestContext<RoleServer>) -> Result<Caller, String> {
    let header = context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.headers.get(TOKEN_HEADER));
    let Some(header) = header else {
        return Ok(Caller::Anonymous);
    };
    let invalid = || {
        "The X-MCP-Marketplace-Token header is present but is not a JWT with a string `sub` \
         claim, so the caller cannot be identified. Send a valid token or omit the header."
            .to_owned()
    };
    let token = header.to_str().map_err(|_| invalid())?.trim();
    let token = match token.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => token[7..].trim(),
        _ => token,
    };
    jwt_subject(token).map(Caller::Subject).ok_or_else(invalid)
}

fn error_result(message: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message.into())])
}

/// A successful result with `value` as structured content and its JSON as text.
fn structured_result<T: Serialize>(value: &T) -> CallToolResult {
    match serde_json::to_value(value) {
        Ok(json) => CallToolResult::structured(json),
        Err(error) => error_result(format!("internal error serializing the result: {error}")),
    }
}

fn not_found(id: &str) -> CallToolResult {
    error_result(format!(
        "No note with id \"{}\" exists for this caller. Use list_notes or search_notes to \
         find the ids of your notes.",
        id.trim()
    ))
}

/// Trims, drops empty and case-insensitively duplicated tags, and checks limits.
fn clean_tags(tags: Vec<String>) -> Result<Vec<String>, String> {
    let mut cleaned: Vec<String> = Vec::new();
    for tag in tags {
        let tag = tag.trim();
        if tag.is_empty()
            || cleaned
                .iter()
                .any(|seen| seen.to_lowercase() == tag.to_lowercase())
        {
            continue;
        }
        let chars = tag.chars().count();
        if chars > MAX_TAG_CHARS {
            return Err(format!(
                "The tag \"{}…\" is {chars} characters long; tags may have at most \
                 {MAX_TAG_CHARS} characters.",
                tag.chars().take(20).collect::<String>()
            ));
        }
        cleaned.push(tag.to_owned());
    }
    if cleaned.len() > MAX_TAGS {
        return Err(format!(
            "A note may carry at most {MAX_TAGS} distinct tags; {} were given.",
            cleaned.len()
        ));
    }
    Ok(cleaned)
}

/// The notes MCP server. Cloning shares the store, so give every session a
/// clone of one `Notes` (as [`super::spawn_notes`] does) to let all sessions of
/// a server see the same notes; each caller still only sees their own.
#[derive(Debug, Clone)]
pub struct Notes {
    store: Arc<DashMap<Caller, Vec<Note>>>,
    tool_router: ToolRouter<Self>,
}

impl Notes {
    /// Creates a server with a new, empty in-memory store.
    pub fn new() -> Self {
        Self {
            store: Arc::new(DashMap::new()),
            tool_router: Self::tool_router(),
        }
    }
}

impl Default for Notes {
    fn default() -> Self {
        Self::new()
    }
}

#[tool_router]
impl Notes {
    #[tool(
        description = "Save a new note for the calling user. `title` is required (1-200 \
            characters), `body` is the text (up to 64 KiB), `tags` an optional list of labels \
            for list_notes filtering. Returns the stored note with its generated `id` and \
            `created_at` (RFC 3339). Each user may keep up to 1000 notes.",
        output_schema = schema_for_output::<Note>(),
        annotations(
            title = "Add a note",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    fn add_note(
        &self,
        Parameters(args): Parameters<AddNoteArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match caller_of(&context) {
            Ok(caller) => caller,
            Err(message) => return error_result(message),
        };
        let title = args.title.trim();
        if title.is_empty() {
            return error_result("The title must not be empty.");
        }
        let title_chars = title.chars().count();
        if title_chars > MAX_TITLE_CHARS {
            return error_result(format!(
                "The title is {title_chars} characters long; the limit is {MAX_TITLE_CHARS}. \
                 Shorten it and put the details in the body."
            ));
        }
        if args.body.len() > MAX_BODY_BYTES {
            return error_result(format!(
                "The body is {} bytes; the limit is {MAX_BODY_BYTES} bytes (64 KiB). Split it \
                 into several notes.",
                args.body.len()
            ));
        }
        let tags = match clean_tags(args.tags) {
            Ok(tags) => tags,
            Err(message) => return error_result(message),
        };
        let note = Note {
            id: uuid::Uuid::now_v7().to_string(),
            title: title.to_owned(),
            body: args.body,
            tags,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let mut notebook = self.store.entry(caller).or_default();
        if notebook.len() >= MAX_NOTES_PER_CALLER {
            return error_result(format!(
                "You already have {MAX_NOTES_PER_CALLER} notes, the maximum. Delete some with \
                 delete_note before adding more."
            ));
        }
        notebook.push(note.clone());
        drop(notebook);
        structured_result(&note)
    }

    #[tool(
        description = "List the calling user's notes, oldest first. Pass `tag` to return only \
            notes carrying that tag (case-insensitive). Returns {count, notes}.",
        output_schema = schema_for_output::<NoteList>(),
        annotations(
            title = "List notes",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn list_notes(
        &self,
        Parameters(args): Parameters<ListNotesArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match caller_of(&context) {
            Ok(caller) => caller,
            Err(message) => return error_result(message),
        };
        let tag = args
            .tag
            .as_deref()
            .map(|tag| tag.trim().to_lowercase())
            .filter(|tag| !tag.is_empty());
        let notes: Vec<Note> = self
            .store
            .get(&caller)
            .map(|notebook| {
                notebook
                    .iter()
                    .filter(|note| match &tag {
                        Some(tag) => note.tags.iter().any(|t| t.to_lowercase() == *tag),
                        None => true,
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        structured_result(&NoteList {
            count: notes.len(),
            notes,
        })
    }

    #[tool(
        description = "Find the calling user's notes whose title or body contains `query` \
            (case-insensitive substring match). Returns {count, notes}, oldest first.",
        output_schema = schema_for_output::<NoteList>(),
        annotations(
            title = "Search notes",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn search_notes(
        &self,
        Parameters(args): Parameters<SearchNotesArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match caller_of(&context) {
            Ok(caller) => caller,
            Err(message) => return error_result(message),
        };
        let query = args.query.trim().to_lowercase();
        if query.is_empty() {
            return error_result("The query must not be empty; use list_notes to see all notes.");
        }
        let notes: Vec<Note> = self
            .store
            .get(&caller)
            .map(|notebook| {
                notebook
                    .iter()
                    .filter(|note| {
                        note.title.to_lowercase().contains(&query)
                            || note.body.to_lowercase().contains(&query)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        structured_result(&NoteList {
            count: notes.len(),
            notes,
        })
    }

    #[tool(
        description = "Fetch one of the calling user's notes by its `id`.",
        output_schema = schema_for_output::<Note>(),
        annotations(
            title = "Get a note",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn get_note(
        &self,
        Parameters(args): Parameters<NoteIdArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match caller_of(&context) {
            Ok(caller) => caller,
            Err(message) => return error_result(message),
        };
        let id = args.id.trim();
        let note = self
            .store
            .get(&caller)
            .and_then(|notebook| notebook.iter().find(|note| note.id == id).cloned());
        match note {
            Some(note) => structured_result(&note),
            None => not_found(id),
        }
    }

    #[tool(
        description = "Permanently delete one of the calling user's notes by its `id`. \
            Returns the deleted note.",
        output_schema = schema_for_output::<DeletedNote>(),
        annotations(
            title = "Delete a note",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    fn delete_note(
        &self,
        Parameters(args): Parameters<NoteIdArgs>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let caller = match caller_of(&context) {
            Ok(caller) => caller,
            Err(message) => return error_result(message),
        };
        let id = args.id.trim();
        let deleted = self.store.get_mut(&caller).and_then(|mut notebook| {
            let index = notebook.iter().position(|note| note.id == id)?;
            Some(notebook.remove(index))
        });
        match deleted {
            Some(deleted) => structured_result(&DeletedNote { deleted }),
            None => not_found(id),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Notes {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("notes", env!("CARGO_PKG_VERSION"))
                    .with_title("Notes")
                    .with_description("A private in-memory notebook per user."),
            )
            .with_instructions(
                "Keep short notes for the current user: add_note, list_notes (optionally by \
                 tag), search_notes, get_note and delete_note. Notes live in memory and are \
                 private to the calling user.",
            )
    }
}
