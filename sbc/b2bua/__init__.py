"""The transaction user: calls as two dialogs, routing, registrations, admission."""
