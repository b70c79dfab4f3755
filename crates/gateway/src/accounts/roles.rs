//! Who may do what: the roles of organisation members and the one permission matrix every
//! management endpoint asks ([`Principal::require`]).
//!
//! Marga has no browser sessions, so roles act through keys: a management key belongs to a
//! member and acts with that member's role (read from the member cache at every request, so a
//! role change reaches every instance within a refresh); the master key acts as the owner of
//! the default organisation. Inference keys call models and manage nothing.
//!
//! | action | owner | admin | member |
//! |---|---|---|---|
//! | [`Action::ReadOrg`]: keys, guardrails, workspaces, members, routing, credits | ✓ | ✓ | ✓ |
//! | [`Action::ManageKeys`]: create, change and revoke keys (not an owner's management keys) | ✓ | ✓ | |
//! | [`Action::ManageGuardrails`]: guardrails and their assignments | ✓ | ✓ | |
//! | [`Action::ManageWorkspaces`] | ✓ | ✓ | |
//! | [`Action::ManageRouting`]: saved fallback chains | ✓ | ✓ | |
//! | [`Action::ManageMembers`]: add admins and members, remove them | ✓ | ✓ | |
//! | [`Action::ManageOwners`]: change roles; add, remove or hand keys to owners | ✓ | | |

use super::{KeyKind, Principal};
use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// What a management request does (see the module's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ReadOrg,
    ManageKeys,
    ManageGuardrails,
    ManageWorkspaces,
    ManageRouting,
    ManageMembers,
    ManageOwners,
}

impl Action {
    fn describe(self) -> &'static str {
        match self {
            Action::ReadOrg => "read this organisation",
            Action::ManageKeys => "manage keys",
            Action::ManageGuardrails => "manage guardrails",
            Action::ManageWorkspaces => "manage workspaces",
            Action::ManageRouting => "manage routing",
            Action::ManageMembers => "manage members",
            Action::ManageOwners => "change roles or act on owners",
        }
    }
}

/// The permission matrix: the only place that decides what a role may do.
pub fn allows(role: Role, action: Action) -> bool {
    match role {
        Role::Owner => true,
        Role::Admin => action != Action::ManageOwners,
        Role::Member => action == Action::ReadOrg,
    }
}

impl Principal {
    /// Refuses with 403 `forbidden` unless the caller's key and role allow `action`.
    pub fn require(&self, action: Action) -> Result<(), ApiError> {
        let role = match self.key.kind {
            KeyKind::Inference => {
                return Err(ApiError::Forbidden { message: "only management keys can perform this operation".to_owned() })
            }
            KeyKind::Master => Role::Owner,
            KeyKind::Management => self.role.unwrap_or(Role::Member),
        };
        if allows(role, action) {
            Ok(())
        } else {
            let message = format!("the {} role cannot {}", role.as_str(), action.describe());
            Err(ApiError::Forbidden { message })
        }
    }

    /// The caller's role in its organisation (management keys and the master key).
    pub fn role(&self) -> Option<Role> {
        match self.key.kind {
            KeyKind::Master => Some(Role::Owner),
            KeyKind::Management => self.role,
            KeyKind::Inference => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix() {
        use Action::*;
        let all = [ReadOrg, ManageKeys, ManageGuardrails, ManageWorkspaces, ManageRouting, ManageMembers, ManageOwners];
        for action in all {
            assert!(allows(Role::Owner, action), "{action:?}");
            assert_eq!(allows(Role::Admin, action), action != ManageOwners, "{action:?}");
            assert_eq!(allows(Role::Member, action), action == ReadOrg, "{action:?}");
        }
    }
}
