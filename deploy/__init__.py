"""Deployment: the local stack launcher (`deploy.local`) beside the Helm chart in helm/."""
