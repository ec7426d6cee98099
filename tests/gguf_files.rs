use crate::util;
