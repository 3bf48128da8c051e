"""Safe rollout of a model to an endpoint: which run serves it and which is on trial (`registry`), the promotion
gate that compares them on the same photos (`gate`), canary, promote and rollback on either backend (`deploy`),
the prediction log the predictor appends to the store (`predlog`) and the drift report read from it (`monitor`)."""
