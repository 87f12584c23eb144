"""What every stage needs and nothing heavier: params, paths, errors, device choice, git, figure helpers.

Imports no other kennel folder."""
