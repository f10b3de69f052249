//! The task monitor's API: recent tasks page by page, and counts per state.

use axum::extract::{Query, State};
use axum::Json;
use imgclf::{TaskId, TaskQuery, TaskState};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::docs::{ErrorBody, TaskPage, TaskSummary};
use crate::{ApiError, AppState};

/// Tasks per page unless the client asks for another number.
const DEFAULT_PAGE: usize = 50;
/// Most tasks per page.
const MAX_PAGE: usize = 200;

/// Which tasks to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    /// Only tasks in this state: `PENDING`, `STARTED`, `SUCCESS` or `FAILURE`.
    state: Option<String>,
    /// Tasks per page, 1 to 200 (default 50).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A cursor is the last task of a page: `<created_at_ms>_<task_id>`.
fn cursor(created_at_ms: i64, id: TaskId) -> String {
    format!("{created_at_ms}_{id}")
}

fn parse_cursor(text: &str) -> Option<(i64, TaskId)> {
    let (at, id) = text.split_once('_')?;
    Some((at.parse().ok()?, id.parse().ok()?))
}

/// Recent tasks, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/tasks",
    tag = "tasks",
    params(ListParams),
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "A page of tasks, newest first", body = TaskPage),
        (status = 400, description = "A query string that cannot be read (not UTF-8, a field twice)", body = ErrorBody),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 422, description = "A bad state, limit or cursor", body = ErrorBody),
        (status = 503, description = "The result store is unreachable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<TaskPage>, ApiError> {
    let filter = match params.state.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            text.to_ascii_uppercase()
                .parse::<TaskState>()
                .map_err(|_| {
                    ApiError::unprocessable("'state' must be PENDING, STARTED, SUCCESS or FAILURE")
                })?,
        ),
    };
    let limit = match params.limit.as_deref().map(str::trim) {
        None | Some("") => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "'limit' must be a whole number from 1 to {MAX_PAGE}"
                ))
            })?,
    };
    let after = match params.cursor.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            parse_cursor(text)
                .ok_or_else(|| ApiError::unprocessable("'cursor' is not one this API gave out"))?,
        ),
    };
    let query = TaskQuery {
        state: filter,
        after,
        // One more than asked: whether it comes back says if there is a next page.
        limit: limit + 1,
    };
    let mut records = state
        .submitter
        .ports()
        .results
        .list(&query)
        .await
        .map_err(ApiError::unavailable)?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next_cursor = more
        .then(|| records.last().map(|r| cursor(r.created_at_ms, r.task_id)))
        .flatten();
    Ok(Json(TaskPage {
        tasks: records.iter().map(|r| r.to_status()).collect(),
        next_cursor,
    }))
}

/// Tasks per state, the queue's depth and the dead letters.
#[utoipa::path(
    get,
    path = "/api/tasks/summary",
    tag = "tasks",
    security((), ("api_key" = [])),
    responses(
        (status = 200, description = "Counts for the task monitor", body = TaskSummary),
        (status = 401, description = "API keys are set and none was given", body = ErrorBody),
        (status = 408, description = "The request took longer than the request timeout", body = ErrorBody),
        (status = 503, description = "A backend is unreachable", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub(crate) async fn task_summary(
    State(state): State<AppState>,
) -> Result<Json<TaskSummary>, ApiError> {
    let ports = state.submitter.ports();
    let (counts, depth, dead) = tokio::join!(
        ports.results.count_by_state(),
        ports.queue.depth(),
        ports.queue.dead_letters()
    );
    Ok(Json(TaskSummary {
        counts: counts.map_err(ApiError::unavailable)?,
        queue_depth: depth.map_err(ApiError::unavailable)?,
        dead_letters: dead.map_err(ApiError::unavailable)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_read_back() {
        let id = TaskId::new();
        assert_eq!(
            parse_cursor(&cursor(1_700_000_000_123, id)),
            Some((1_700_000_000_123, id))
        );
        assert_eq!(parse_cursor("nonsense"), None);
        assert_eq!(parse_cursor("12_not-a-uuid"), None);
    }
}
