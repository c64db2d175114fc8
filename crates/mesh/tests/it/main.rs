//! Integration tests of nicwarden-mesh: the controller's planner driving one agent core per
//! node, on a simulated clock.

mod planner_agent;
