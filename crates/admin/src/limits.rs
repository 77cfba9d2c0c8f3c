//! At most `HERALD_MAX_WEBHOOKS_PER_WORKFLOW` webhooks of an organization may
//! name the same workflow in their `workflow` filter.

use herald_core::proto;

use crate::AppState;
use crate::error::ApiError;

/// Refuses `webhook` when one of its workflows already has the maximum of
/// other webhooks (`except`: the webhook's own id, when it is updated).
pub async fn check_workflow_limit(
    state: &AppState,
    webhook: &proto::Webhook,
    except: Option<&str>,
) -> Result<(), ApiError> {
    let Some(workflows) = webhook.filters.get("workflow") else {
        return Ok(());
    };
    let max = state.config.max_webhooks_per_workflow;
    let existing = state.store.list(&webhook.organization_id).await?;
    for workflow in &workflows.values {
        let count = existing
            .iter()
            .filter(|w| Some(w.id.as_str()) != except)
            .filter(|w| {
                w.filters
                    .get("workflow")
                    .is_some_and(|f| f.values.contains(workflow))
            })
            .count();
        if count >= max {
            return Err(ApiError::validation(
                "filters",
                format!("workflow {workflow:?} already has {count} webhooks, the maximum is {max}"),
            ));
        }
    }
    Ok(())
}
