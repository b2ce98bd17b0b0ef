"""Records -> tables -> verdicts -> figures -> reports. Reads run folders; never imports training."""
