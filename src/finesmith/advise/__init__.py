"""The advisor: from hardware, model shape, data size, task and goal to a fine-tuning approach."""
