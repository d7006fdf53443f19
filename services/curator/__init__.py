"""The curator: joins feedback with generations into preference data, refreshes the reward model."""
