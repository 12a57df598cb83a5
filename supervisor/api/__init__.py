"""The front doors: the RunPod serverless handler and the self-hosted HTTP API with RunPod's contract."""
